"""Keras-form Adam against its closed form, and the seed's learning rate for all 50 epochs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resnet_jax as rj

# The seed log's "Learning rate:" line for each 1-based epoch.
SEED_LR = {e: 1e-3 if e <= 26 else 1e-4 if e <= 36 else 1e-6 if e <= 46 else 5e-7 for e in range(1, 51)}


def keras_adam_reference(grads, lr, b1=0.9, b2=0.999, eps=1e-7):
    """RECIPE.md's closed form, in float64 numpy: the parameter change of each step."""
    m = np.zeros_like(grads[0], np.float64)
    v = np.zeros_like(m)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps))
    return out


def run(tx, grads):
    """The parameter change of each step (the updates optax.apply_updates adds)."""
    params = jnp.zeros(grads[0].shape, jnp.float32)
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        out.append(np.asarray(updates))
    return out


def test_keras_adam_matches_closed_form():
    rng = np.random.default_rng(0)
    # Tiny gradients make epsilon matter: there Keras and optax disagree most.
    grads = [rng.normal(size=(50,)) * s for s in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1, 1e-6, 3e-7)]
    tx = optax.chain(rj.model.optim.scale_by_keras_adam(), optax.scale_by_learning_rate(1e-3))
    ours, ref = run(tx, grads), keras_adam_reference(grads, 1e-3)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=2e-6)
    # ...where plain optax.adam(eps=1e-7) is visibly different during the first steps.
    plain = run(optax.adam(1e-3, eps=1e-7), grads)
    assert np.max(np.abs(plain[0] - ref[0]) / np.abs(ref[0])) > 1e-2


def test_schedule_gives_seed_rate_for_every_epoch():
    config, spe = rj.Config(), 1563
    sched = rj.model.optim.schedule(config, spe)
    for epoch, lr in SEED_LR.items():
        first, last = (epoch - 1) * spe, epoch * spe - 1
        assert float(sched(first)) == pytest.approx(lr, rel=1e-6), epoch
        assert float(sched(last)) == pytest.approx(lr, rel=1e-6), epoch
        assert rj.model.optim.lr_for_epoch(config, epoch) == pytest.approx(lr, rel=1e-12)
        assert f"{rj.model.optim.lr_for_epoch(config, epoch):g}" in ("0.001", "0.0001", "1e-06", "5e-07")


@pytest.mark.parametrize("spe", [1, 7, 391])
def test_schedule_boundaries_follow_steps_per_epoch(spe):
    sched = rj.model.optim.schedule(rj.Config(), spe)
    for boundary, before, after in ((26, 1e-3, 1e-4), (36, 1e-4, 1e-6), (46, 1e-6, 5e-7)):
        assert float(sched(boundary * spe - 1)) == pytest.approx(before, rel=1e-6)
        assert float(sched(boundary * spe)) == pytest.approx(after, rel=1e-6)


def test_optimizer_applies_schedule_per_step():
    """make_optimizer = Keras Adam then the scheduled rate: step k uses the rate of its epoch."""
    config = dataclasses.replace(rj.Config(), lr_epochs=(2,), lr_factors=(0.5,))
    tx = rj.model.optim.make_optimizer(config, steps_per_epoch=3)
    unit = optax.chain(rj.model.optim.scale_by_keras_adam(), optax.scale_by_learning_rate(1.0))
    params = jnp.zeros(4)
    state, unit_state = tx.init(params), unit.init(params)
    for k in range(9):
        g = jnp.full((4,), 0.1 * (k + 1))
        u, state = tx.update(g, state, params)
        ref, unit_state = unit.update(g, unit_state, params)
        rate = 1e-3 if k < 6 else 5e-4
        np.testing.assert_allclose(u, rate * ref, rtol=1e-6)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("seed", {}),
        ("resnet20v2", {}),
        ("tiny", {}),
        ("seed", {"learning_rate": 3e-3, "lr_epochs": (3, 5, 7), "lr_factors": (0.3, 0.7, 1.9)}),
        ("seed", {"learning_rate": 0.1, "lr_epochs": (1, 2), "lr_factors": (0.5, 0.1)}),
        ("seed", {"lr_epochs": (), "lr_factors": ()}),
    ],
)
def test_the_printed_rate_is_optaxs_schedule_in_float64_to_the_bit(name, fields):
    """lr_for_epoch, in plain Python, equals optax's piecewise_constant_schedule evaluated under
    float64 exactly, for every epoch of the run and past its last boundary."""
    config = rj.preset(name, **fields)
    sched = rj.model.optim.schedule(config, 1)
    with jax.enable_x64(True):
        for epoch in range(1, max((config.epochs, *config.lr_epochs)) + 3):
            want = float(jax.device_get(sched(epoch - 1)))
            assert rj.model.optim.lr_for_epoch(config, epoch) == want, (epoch, want)


def test_every_setting_shares_one_init_equal_to_its_own_chains():
    """make_optimizer's transformations share one `init` (the initialisation compiles once
    whatever the rate), and it initialises as the chain of each one's own settings does."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2, jnp.bfloat16)}
    configs = [(rj.Config(), 10), (rj.presets.tiny(learning_rate=0.3, adam_b1=0.8, adam_eps=1e-5), 7)]
    made = [rj.model.optim.make_optimizer(c, spe) for c, spe in configs]
    assert made[0].init is made[1].init and made[0].update is not made[1].update
    for (config, spe), tx in zip(configs, made):
        own = optax.chain(
            rj.model.optim.scale_by_keras_adam(config.adam_b1, config.adam_b2, config.adam_eps),
            optax.scale_by_learning_rate(rj.model.optim.schedule(config, spe)),
        )
        got, want = tx.init(params), own.init(params)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
