"""The parts of a run, decided once at the top (`train_and_evaluate`, `create_train_state`) and
passed down: the model, the optimizer, the augmentation, and how to read the learning rate.

Each is the Config's (the seed recipe: `resnet.ResNet`, Keras-form Adam on the piecewise-constant
schedule, shift + flip) unless the user brings their own, following Flax/optax conventions:

- `model`: a `flax.linen.Module` called as `model(images, train=bool)` on preprocessed float
  images, returning logits `(N, num_classes)`. BatchNorm statistics (the `batch_stats`
  collection) are optional; `nn.Dropout` gets a `dropout` rng derived from the step's key.
- `optimizer`: an `optax.GradientTransformation`, or a function `steps_per_epoch ->
  GradientTransformation` (so a schedule can span the run). Its learning rate is shown when it
  is `optax.inject_hyperparams`-wrapped (the rate of each epoch's first step); otherwise none is.
- `augment`: a jit-able `(key, images) -> images` on a preprocessed float batch.

Every part is checked here, abstractly (nothing is computed): bad ones are one UserError line.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import process
from resnet_jax.config import Config
from resnet_jax.errors import UserError
from resnet_jax.model import optim, resnet, steps
from resnet_jax.model.augment import augment as seed_augment
from resnet_jax.model.memo import per_process
from resnet_jax.model.steps import check_image_shape, init_state


@dataclasses.dataclass(frozen=True)
class Parts:
    model: Any  # flax.linen.Module
    tx: optax.GradientTransformation
    augment: Callable  # (key, images) -> images
    rate: Callable  # (state, epoch) -> the learning rate of the epoch's first step, or None
    record: dict  # what run.json and the start-up report say of the parts


def name_of(fn) -> str:
    """A readable name of a function (module.qualname; partials and callables too)."""
    if isinstance(fn, functools.partial):
        return f"partial({name_of(fn.func)})"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return qualname if module in (None, "__main__", "builtins") else f"{module}.{qualname}"


def resolve(config, image_shape, steps_per_epoch: int, platform, *, model=None, optimizer=None, augment=None):
    """The run's Parts: the user's where given (checked), else the Config's."""
    image_shape = check_image_shape(image_shape)
    if steps_per_epoch <= 0:
        raise UserError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    own_model = model is not None
    if own_model:
        variables = _check_model(model, image_shape, config.num_classes)
    else:  # the library's ResNet, checked by its tests: its variables' shapes only (one trace)
        model = resnet.from_config(config, materialize=platform.materialize)
        variables = resnet.abstract_variables(model, image_shape)
    own_optimizer = optimizer is not None
    tx = (
        optim.make_optimizer(config, steps_per_epoch)
        if optimizer is None
        else _check_optimizer(optimizer, steps_per_epoch)
    )
    opt_state = jax.eval_shape(tx.init, variables["params"])
    own_augment = augment is not None
    if own_augment:
        _check_augment(augment, (config.batch_size,) + image_shape)
    else:
        augment = functools.partial(seed_augment, config=config)

    if not own_optimizer:
        rate, shown = (lambda state, epoch: optim.lr_for_epoch(config, epoch)), "the Config's schedule"
    elif (peek := _injected_rate(tx, opt_state)) is not None:
        rate, shown = peek, "inject_hyperparams"
    else:
        rate, shown = (lambda state, epoch: None), "not shown"
    count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
    record = {
        "model": {
            "own": own_model,
            "class": type(model).__name__,
            "name": type(model).__name__ if own_model else resnet.name(config),
            "parameters": count(variables["params"]),
            "batch_stats": count(variables.get("batch_stats", {})),
        },
        "optimizer": {
            "own": own_optimizer,
            "name": _optimizer_name(optimizer, opt_state) if own_optimizer else "Keras-form Adam",
            "learning_rate": shown,
        },
        "augment": {
            "own": own_augment,
            "name": name_of(augment)
            if own_augment
            else f"shift {config.shift_range:g} + {'flip' if config.flip else 'no flip'}",
        },
    }
    return Parts(model, tx, augment, rate, record)


def _check_model(model, image_shape, num_classes: int) -> dict:
    """The model's abstract variables, after checking it is a Module that takes (images, train=)
    and returns (N, num_classes) logits."""
    import flax.linen as nn

    if not isinstance(model, nn.Module):
        raise UserError(
            "model must be a flax.linen.Module called as model(images, train=...), "
            f"got {type(model).__name__}"
        )
    try:
        hash(model)
    except TypeError:
        raise UserError(
            f"model {type(model).__name__} has unhashable attributes (lists or dicts); use tuples"
        ) from None
    variables, logits, trained = _traced(model, image_shape)
    extra = sorted(set(variables) - {"params", "batch_stats"})
    if extra:
        raise UserError(
            f"model {type(model).__name__} has variables in {', '.join(extra)}; resnet_jax trains "
            "params and keeps batch_stats, nothing else"
        )
    for got in (logits, trained):
        shape, dtype = getattr(got, "shape", None), getattr(got, "dtype", None)
        if shape != (2, num_classes) or not jnp.issubdtype(dtype, jnp.floating):
            raise UserError(
                f"model {type(model).__name__} returns {dtype} of shape {shape} for a batch of 2 images of "
                f"{'x'.join(map(str, image_shape))}; it must return float logits of shape "
                f"(2, {num_classes}) for this dataset's {num_classes} classes"
            )
    return variables


@per_process(maxsize=32)
def _traced(model, image_shape: tuple):
    """(variables, inference logits, training logits) of a batch of 2, abstract: traced once per
    model and image shape in a process (a notebook's next run, each seed of train_many)."""
    x = jax.ShapeDtypeStruct((2,) + image_shape, jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    try:
        variables = resnet.abstract_variables(model, image_shape)
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
        trained = jax.eval_shape(
            lambda v, k, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0],
            variables,
            key,
            x,
        )
    except TypeError as e:
        if "train" not in str(e):
            raise
        raise UserError(
            f"model {type(model).__name__} must take a `train` argument: model(images, train=True|False) "
            f"({str(e).splitlines()[0]})"
        ) from None
    return variables, logits, trained


def _check_optimizer(optimizer, steps_per_epoch: int) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if not callable(optimizer):
        raise UserError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)) or a function "
            f"steps_per_epoch -> GradientTransformation, got {type(optimizer).__name__}"
        )
    try:
        first = next(iter(inspect.signature(optimizer).parameters), None)
    except (TypeError, ValueError):
        first = None
    if first == "learning_rate":
        raise UserError(
            f"optimizer {name_of(optimizer)} is an optax constructor; call it: e.g. "
            f"{getattr(optimizer, '__name__', 'optax.sgd')}(1e-3), or pass a function of steps_per_epoch"
        )
    tx = optimizer(steps_per_epoch)
    if not isinstance(tx, optax.GradientTransformation):
        raise UserError(
            f"optimizer {name_of(optimizer)}(steps_per_epoch) returned {type(tx).__name__}; it must "
            "return an optax.GradientTransformation"
        )
    return tx


def _check_augment(augment, batch_shape):
    if not callable(augment):
        raise UserError(f"augment must be a function (key, images) -> images, got {type(augment).__name__}")
    x = jax.ShapeDtypeStruct(batch_shape, jnp.float32)
    try:
        out = jax.eval_shape(augment, jax.eval_shape(lambda: jax.random.key(0)), x)
    except jax.errors.JAXTypeError as e:
        raise UserError(
            f"augment {name_of(augment)} is not jit-able ({str(e).splitlines()[0][:200]})"
        ) from None
    except TypeError as e:
        raise UserError(
            f"augment {name_of(augment)} must be called as augment(key, images) "
            f"({str(e).splitlines()[0][:200]})"
        ) from None
    if getattr(out, "shape", None) != x.shape or getattr(out, "dtype", None) != x.dtype:
        raise UserError(
            f"augment {name_of(augment)} turns float32 images of shape {x.shape} into "
            f"{getattr(out, 'dtype', type(out).__name__)} of shape {getattr(out, 'shape', None)}; "
            "it must return images of the same shape and dtype"
        )


def _injected(opt_state):
    """The inject_hyperparams states in an optimizer state that carry a learning rate."""
    kind = optax.InjectStatefulHyperparamsState
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
    return [s for s in nodes if isinstance(s, kind) and "learning_rate" in s.hyperparams]


def _injected_rate(tx, opt_state):
    """(state, epoch) -> the rate the next step will use, read from inject_hyperparams: one
    update of zero gradients on a copy of the state (the hyperparams it would record); None when
    the optimizer injects no learning_rate."""
    if not _injected(opt_state):
        return None

    @jax.jit
    def peek(params, opt_state):
        _, new = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
        return _injected(new)[0].hyperparams["learning_rate"]

    return lambda state, epoch: float(np.asarray(peek(state.params, state.opt_state)))


def _optimizer_name(optimizer, opt_state) -> str:
    """The user's function, or the optax state's kinds (what a GradientTransformation shows)."""
    kinds = []
    for node in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "_fields")):
        if hasattr(node, "_fields") and type(node).__name__ not in kinds:
            kinds.append(type(node).__name__)
    for s in _injected(opt_state):
        kinds.append(f"hyperparams {', '.join(sorted(s.hyperparams))}")
    state = f"state: {', '.join(kinds)}" if kinds else "stateless"
    if isinstance(optimizer, optax.GradientTransformation):
        return f"optax GradientTransformation ({state})"
    return f"{name_of(optimizer)}(steps_per_epoch) ({state})"


def create_train_state(
    config: Config,
    rng: jax.Array,
    image_shape,
    steps_per_epoch: int,
    *,
    model=None,
    optimizer=None,
    materialize: bool | None = None,
) -> steps.TrainState:
    """Initialise a model (the Config's ResNet, or yours) and optimizer (the Config's Keras-form
    Adam, or an optax transformation / a function of steps_per_epoch returning one) for images of
    `image_shape` (H, W, C). `materialize` (the ResNet's CPU speed setting) defaults to what
    resnet_jax.tuning decides for the platform JAX runs on (the first call in a process sets the
    process up, as a run does: process.setup)."""
    process.setup()
    platform = process.current()
    if materialize is not None:
        platform = dataclasses.replace(platform, materialize=materialize)
    parts = resolve(config, image_shape, steps_per_epoch, platform, model=model, optimizer=optimizer)
    return init_state(parts.model, parts.tx, config, rng, image_shape)
