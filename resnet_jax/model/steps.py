"""Train state and the pure step functions: loss, train_step, eval_step, predict.

The state is Flax's `TrainState` (step, params, opt_state, `apply_fn`, `tx`, `apply_gradients`)
plus the BatchNorm statistics (empty for a model without BatchNorm), the training set's per-pixel
mean and the run's Config. A checkpoint saves exactly its array fields, whatever the model and
optimizer make of them.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from resnet_jax.config import Config
from resnet_jax.errors import UserError
from resnet_jax.model.memo import per_process

DROPOUT = 0x64726F70  # fold_in constant deriving a step's dropout key from its data key


class TrainState(train_state.TrainState):
    """Flax's TrainState with `batch_stats`, `pixel_mean` (float32 HxWxC, for predict) and the
    run's `config` (static). `apply_fn` is the model's `apply`; `model` is that model."""

    batch_stats: Any
    pixel_mean: jax.Array
    config: Config = flax.struct.field(pytree_node=False)

    @property
    def model(self):
        return getattr(self.apply_fn, "__self__", None)

    def variables(self) -> dict:
        """What `apply_fn` takes: params, and batch_stats when the model has any."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def check_image_shape(image_shape) -> tuple:
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape) <= 0:
        raise UserError(f"image_shape must be (height, width, channels), got {image_shape}")
    return image_shape


def initial_arrays(model, opt_init, image_shape):
    """rng -> the initial state's arrays (step, params, batch_stats, opt_state, pixel_mean);
    `opt_init` is the optimizer's `init` (the library's optimizers share one: optim.make_optimizer)."""

    def init(rng):
        x = jnp.zeros((1,) + image_shape, jnp.float32)
        variables = model.init({"params": rng, "dropout": rng}, x, train=False)
        params = variables["params"]
        return dict(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=opt_init(params),
            pixel_mean=jnp.zeros(image_shape, jnp.float32),
        )

    return init


def init_state(model, tx, config: Config, rng: jax.Array, image_shape) -> TrainState:
    """The initial state of `model` and `tx`, computed on the host CPU on every platform (one
    small compile there instead of many small GPU kernels; the same numbers whatever the
    accelerator); the training loop places it on the devices."""
    init = _jitted_init(model, tx.init, check_image_shape(image_shape))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        arrays = init(jax.device_put(rng))
    return TrainState(**arrays, apply_fn=model.apply, tx=tx, config=config)


@per_process(maxsize=16)
def _jitted_init(model, opt_init, image_shape):
    """The jitted initialisation, one per (model, optimizer's init, shape) in this process: a
    second run of them, or a run at another rate, compiles nothing."""
    return jax.jit(
        initial_arrays(model, opt_init, image_shape), compiler_options={"xla_backend_optimization_level": 0}
    )


def l2_penalty(params, config: Config) -> jax.Array:
    """config.l2_weight * sum(kernel**2) over conv (4-D) and/or dense (2-D) kernels."""
    ndims = {"conv": 4, "dense": 2}
    wanted = {ndims[k] for k in config.l2_layers}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(
        (
            jnp.sum(jnp.square(w))
            for path, w in leaves
            if getattr(path[-1], "key", None) == "kernel" and w.ndim in wanted
        ),
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


def train_step(state: TrainState, images, labels, key: jax.Array | None = None):
    """One optimizer step on a preprocessed batch: (state, images, labels) -> (state, metrics).

    BatchNorm runs in training mode and its moving statistics are updated. `key` feeds the
    model's `dropout` rng (derived from it; by default from the step number). metrics["loss"]
    is (cross-entropy + L2) times the batch size; see `summed_metrics`.
    """
    _check_inputs(images, labels, state.config.num_classes)
    if key is None:
        key = jax.random.fold_in(jax.random.key(0), state.step)
    rngs = {"dropout": jax.random.fold_in(key, DROPOUT)}

    def loss_fn(params):
        variables = state.replace(params=params).variables()
        logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
        logits = jnp.asarray(logits, jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + l2_penalty(params, state.config), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state, summed_metrics(loss, logits, labels)


def logits_of(state: TrainState, images):
    """The model's float32 logits in inference mode (BatchNorm moving statistics)."""
    return jnp.asarray(state.apply_fn(state.variables(), images, train=False), jnp.float32)


def eval_step(state: TrainState, images, labels, weights=None):
    """Metrics with BatchNorm moving statistics; `weights` (0/1) masks padded rows."""
    _check_inputs(images, labels, state.config.num_classes)
    logits = logits_of(state, images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return summed_metrics(ce + l2_penalty(state.params, state.config), logits, labels, weights)


def preprocess(images_u8, mean):
    """uint8 images as the model sees them: scaled to [0, 1], the training set's pixel mean off."""
    return images_u8.astype(jnp.float32) / 255.0 - mean


@jax.jit
def _probabilities(state: TrainState, images_u8):
    return jax.nn.softmax(logits_of(state, preprocess(images_u8, state.pixel_mean)))


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
