"""Train state and the pure step functions: loss, train_step, eval_step, predict."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import models, optim, tuning
from resnet_jax.config import Config
from resnet_jax.errors import UserError


class TrainState(flax.struct.PyTreeNode):
    """Everything a checkpoint holds. `config`, `model` and `tx` are static (not saved as arrays)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    pixel_mean: jax.Array  # the training set's per-pixel mean, float32 HxWxC (for predict)
    config: Config = flax.struct.field(pytree_node=False)
    model: Any = flax.struct.field(pytree_node=False)
    tx: Any = flax.struct.field(pytree_node=False)


def create_train_state(
    config: Config, rng: jax.Array, image_shape, steps_per_epoch: int, materialize: bool | None = None
) -> TrainState:
    """Initialise the model for images of `image_shape` (H, W, C) and the optimizer.

    The initial values are computed on the host CPU on every platform (one small compile there
    instead of many small GPU kernels; the same numbers whatever the accelerator); the training
    loop places them on the devices. `materialize` (a CPU speed setting, see models.materialize)
    defaults to what resnet_jax.tuning decides for the platform JAX runs on.
    """
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape) <= 0:
        raise UserError(f"image_shape must be (height, width, channels), got {image_shape}")
    if steps_per_epoch <= 0:
        raise UserError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if materialize is None:
        materialize = tuning.started().materialize
    model = models.from_config(config, materialize=materialize)
    tx = optim.make_optimizer(config, steps_per_epoch)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return TrainState(
            **_init(model, tx, image_shape, jax.device_put(rng)), config=config, model=model, tx=tx
        )


@functools.partial(
    jax.jit, static_argnums=(0, 1, 2), compiler_options={"xla_backend_optimization_level": 0}
)  # runs once
def _init(model, tx, image_shape, rng):
    variables = model.init(rng, jnp.zeros((1,) + image_shape, jnp.float32), train=False)
    params = variables["params"]
    return dict(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        pixel_mean=jnp.zeros(image_shape, jnp.float32),
    )


def abstract_train_state(config: Config, image_shape, steps_per_epoch: int) -> TrainState:
    """The state's structure, shapes and dtypes without computing it (jax.eval_shape): the
    template to restore a checkpoint into."""
    model = models.from_config(config, materialize=tuning.started().materialize)
    tx = optim.make_optimizer(config, steps_per_epoch)
    shapes = jax.eval_shape(
        lambda rng: _init.__wrapped__(model, tx, tuple(image_shape), rng),
        jax.eval_shape(lambda: jax.random.key(0)),
    )
    return TrainState(**shapes, config=config, model=model, tx=tx)


def l2_penalty(params, config: Config) -> jax.Array:
    """config.l2_weight * sum(kernel**2) over conv (4-D) and/or dense (2-D) kernels."""
    ndims = {"conv": 4, "dense": 2}
    wanted = {ndims[k] for k in config.l2_layers}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(
        (jnp.sum(jnp.square(w)) for path, w in leaves if path[-1].key == "kernel" and w.ndim in wanted),
        jnp.float32(0),
    )
    return config.l2_weight * total


def _check_inputs(images, labels, num_classes: int):
    if getattr(images, "ndim", None) != 4:
        raise UserError(f"images must be a batch of shape (N, H, W, C), got shape {np.shape(images)}")
    if np.shape(labels) != np.shape(images)[:1]:
        raise UserError(
            f"labels must have shape ({np.shape(images)[0]},) to match the images, got {np.shape(labels)}"
        )
    if not isinstance(labels, jax.core.Tracer):
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(
                f"labels must be in [0, {num_classes}), got values from {labels.min()} "
                f"to {labels.max()}; set num_classes to match the data"
            )


def summed_metrics(loss, logits, labels, weights=None):
    """Metrics as sums, so batches of any size add up: mean = sum / count."""
    if weights is None:
        weights = jnp.ones(labels.shape, jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}


def train_step(state: TrainState, images, labels):
    """One Adam step on a preprocessed batch: (state, images, labels) -> (state, metrics).

    BatchNorm runs in training mode and its moving statistics are updated. metrics["loss"] is
    (cross-entropy + L2) times the batch size; see `summed_metrics`.
    """
    _check_inputs(images, labels, state.config.num_classes)

    def loss_fn(params):
        logits, updates = state.model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + l2_penalty(params, state.config), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, summed_metrics(loss, logits, labels)


def eval_step(state: TrainState, images, labels, weights=None):
    """Metrics with BatchNorm moving statistics; `weights` (0/1) masks padded rows."""
    _check_inputs(images, labels, state.config.num_classes)
    logits = state.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return summed_metrics(ce + l2_penalty(state.params, state.config), logits, labels, weights)


@jax.jit
def _probabilities(state: TrainState, images_u8):
    x = images_u8.astype(jnp.float32) / 255.0 - state.pixel_mean
    logits = state.model.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
    return jax.nn.softmax(logits)


def predict(state: TrainState, images, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities for raw uint8 images (N, H, W, C), preprocessed like the training data."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != state.pixel_mean.shape:
        raise UserError(
            f"predict takes uint8 images of shape (N, {', '.join(map(str, state.pixel_mean.shape))}),"
            f" got {images.dtype} {images.shape}"
        )
    out = [
        np.asarray(_probabilities(state, images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, state.config.num_classes), np.float32)
