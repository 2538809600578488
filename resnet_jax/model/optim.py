"""Keras-form Adam and the seed's piecewise-constant learning rate, in optax terms."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class KerasAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7):
    """Adam as Keras 2 computes it: epsilon is added to sqrt(v) *before* bias correction.

        u = sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)

    which is optax's Adam with the time-varying epsilon eps / sqrt(1 - b2**t). The rate and its
    sign come from a following `optax.scale_by_learning_rate`.
    """

    def init(params):
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)
        return KerasAdamState(
            jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        # 1 - b**t as -expm1(t log b), with log b taken in float64: float32's b2**t would lose
        # about 1e-5 of relative accuracy to cancellation.
        scale = jnp.sqrt(-jnp.expm1(t * math.log(b2))) / -jnp.expm1(t * math.log(b1))
        out = jax.tree.map(lambda m, v: scale * m / (jnp.sqrt(v) + eps), mu, nu)
        return out, KerasAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Rate by step: constant within an epoch, scaled at the config's epoch boundaries."""
    return _schedule(config.learning_rate, config.lr_epochs, config.lr_factors, steps_per_epoch)


def _schedule(learning_rate, lr_epochs, lr_factors, steps_per_epoch: int) -> optax.Schedule:
    return optax.piecewise_constant_schedule(
        learning_rate, _boundaries(lr_epochs, lr_factors, steps_per_epoch)
    )


def _boundaries(lr_epochs, lr_factors, steps_per_epoch: int) -> dict:
    return {int(e) * steps_per_epoch: float(f) for e, f in zip(lr_epochs, lr_factors)}


def lr_for_epoch(config, epoch: int) -> float:
    """The rate of 1-based `epoch`, as the seed log prints it (`Learning rate: ...`): optax's
    piecewise_constant_schedule (one step an epoch) in float64, in plain Python. optax multiplies
    the rate by each factor whose boundary is reached (`v * 0 + 1 * factor * v`) and keeps it
    where not (`v * 1 + 0 * factor * v`), both exact in IEEE arithmetic, so the printed rate is
    the exact product of the config's numbers (tests/test_optim.py checks it against optax under
    float64). Python, not optax in JAX: there each eager op compiles a small program, about
    0.2 s at every start of a process."""
    rate = float(config.learning_rate)
    for boundary, factor in sorted(_boundaries(config.lr_epochs, config.lr_factors, 1).items()):
        if epoch - 1 >= boundary:
            rate = factor * rate
    return rate


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Keras-form Adam on the Config's schedule. The same settings give the same transformation
    object within a process (it is a static part of the train state, compared by identity), so
    a second run of them finds its compiled steps."""
    fields = (config.adam_b1, config.adam_b2, config.adam_eps, config.learning_rate)
    return _optimizer(*fields, tuple(config.lr_epochs), tuple(config.lr_factors), steps_per_epoch)


@functools.lru_cache(maxsize=32)
def _optimizer(b1, b2, eps, learning_rate, lr_epochs, lr_factors, steps_per_epoch):
    chain = optax.chain(
        scale_by_keras_adam(b1, b2, eps),
        optax.scale_by_learning_rate(_schedule(learning_rate, lr_epochs, lr_factors, steps_per_epoch)),
    )
    # One init for every setting (it reads none of them: zero moments, zero counts), so the
    # initialisation is one program whatever the rate (steps.init_state: one compile, not one a
    # sweep's setting).
    return chain._replace(init=_INIT)


# The init of every `_optimizer`: (KerasAdamState of zeros, ScaleByScheduleState(count=0)).
_INIT = optax.chain(scale_by_keras_adam(), optax.scale_by_learning_rate(_schedule(1e-3, (), (), 1))).init
