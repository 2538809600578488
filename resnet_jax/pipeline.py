"""The on-device input path: the whole dataset lives on the devices as uint8; each epoch is a
fresh permutation, and each device call runs many train steps (lax.scan) with the augmentation
inside jit. Evaluation is one device call over the padded, masked test set.

Randomness: epoch e's key is fold_in(data_key, e), split into a permutation key and an
augmentation key; step i of the epoch augments with fold_in(augmentation key, i). So the data
of any step of any epoch can be recomputed from (data_key, epoch, step): a run resumed
mid-epoch sees the same batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import parallel, tuning
from resnet_jax.augment import augment as seed_augment
from resnet_jax.data import Dataset
from resnet_jax.steps import eval_step, train_step


class DeviceData(NamedTuple):
    train_images: jax.Array  # uint8 (N, H, W, C), replicated
    train_labels: jax.Array  # int32 (N,)
    test_images: jax.Array  # uint8 (M', H, W, C), padded to a multiple of the eval batch
    test_labels: jax.Array
    test_weights: jax.Array  # float32 (M',): 1 for real rows, 0 for padding
    pixel_mean: jax.Array  # float32 (H, W, C)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Full batches plus one partial batch if the data does not divide (kept, as Keras does)."""
    return -(-num_train // batch_size)


def eval_batch(config, mesh) -> int:
    n = mesh.size
    return -(-config.eval_batch_size // n) * n


def to_device(dataset: Dataset, mean: np.ndarray, config, mesh) -> DeviceData:
    """Place the dataset on every device, the test set padded for exact batched evaluation."""
    train = parallel.replicate((dataset.train_images, dataset.train_labels), mesh)
    return DeviceData(
        *train,
        *eval_set(dataset.test_images, dataset.test_labels, config, mesh),
        parallel.replicate(np.asarray(mean, np.float32), mesh),
    )


def device_bytes(dataset: Dataset, config, mesh) -> int:
    """Bytes the dataset takes on each device (`to_device`): uint8 images, the test set padded,
    int32 labels, float32 weights and the float32 pixel mean."""
    pixels = int(np.prod(dataset.image_shape))
    test = len(dataset.test_images) + (-len(dataset.test_images) % eval_batch(config, mesh))
    return len(dataset.train_images) * (pixels + 4) + test * (pixels + 8) + 4 * pixels


def eval_set(images, labels, config, mesh):
    """(images, labels, weights) on every device, padded to whole evaluation batches (weight 0)."""
    b = eval_batch(config, mesh)
    m, pad = len(images), -len(images) % b
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    weights = np.concatenate([np.ones(m, np.float32), np.zeros(pad, np.float32)])
    return parallel.replicate((images, labels, weights), mesh)


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    return jax.random.fold_in(data_key, epoch)


@functools.partial(jax.jit, static_argnums=1)
def permutation(key: jax.Array, n: int) -> jax.Array:
    return jax.random.permutation(jax.random.split(key)[0], n).astype(jnp.int32)


def preprocess(images_u8, mean):
    return images_u8.astype(jnp.float32) / 255.0 - mean


def chunk_rows(perm, offset, length: int, batch: int):
    """Dataset indices of `length` consecutive batches starting at perm[offset]: (length, batch)."""
    return jax.lax.dynamic_slice_in_dim(perm, offset, length * batch).reshape(length, batch)


def _train_chunk(state, data: DeviceData, perm, offset, step0, key, *, length, batch, mesh, augment=None):
    """`length` train steps of `batch` images from perm[offset:]; step i uses key fold_in(key, step0+i)
    for its augmentation (and, derived from it, its dropout)."""
    rows = chunk_rows(perm, offset, length, batch)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.split(key)[1], step0 + jnp.arange(length))

    def body(state, inputs):
        idx, k = inputs
        idx = parallel.constrain_batch(idx, mesh)
        x = preprocess(data.train_images[idx], data.pixel_mean)
        images = seed_augment(k, x, state.config) if augment is None else augment(k, x)
        return train_step(state, images, data.train_labels[idx], k)

    if length == 1:  # no while loop at all (see make_train_chunk)
        state, m = body(state, (rows[0], keys[0]))
        return state, jax.tree.map(lambda a: a[None], m)
    return jax.lax.scan(body, state, (rows, keys))


def resolve_loop(mesh, loop: str = "auto") -> str:
    """The device loop `auto` stands for on this mesh's platform (resnet_jax.tuning)."""
    if loop == "auto":
        return tuning.decide(mesh.devices.flat[0].platform).device_loop
    return loop


def make_train_chunk(mesh, loop: str = "auto", augment=None) -> TrainChunk:
    """A device call of `length` train steps: f(state, data, perm, offset, step0, key, *, length,
    batch) -> (state, per-step metrics of shape [length]); state donated. `augment(key, images)`
    augments each batch (None: the seed's shift + flip with the state's Config).

    loop "scan": one jitted lax.scan. loop "python": one jitted step per batch, dispatched
    asynchronously; the call returns once its last step is done, with its metrics on the host.
    "auto" picks scan on accelerators and python on CPU, where XLA:CPU runs convolution
    gradients inside a while loop about 15x slower than outside one (resnet_jax.tuning;
    docs/performance.md).
    """
    return TrainChunk(mesh, resolve_loop(mesh, loop), augment)


class TrainChunk:
    """See `make_train_chunk`. Keeps one compiled executable per (length, batch) shape;
    `compile` builds several at once (`compile_all`)."""

    def __init__(self, mesh, loop: str, augment=None):
        self.loop, self.mesh = loop, mesh
        self.step = jax.jit(
            functools.partial(_train_chunk, mesh=mesh, augment=augment),
            static_argnames=("length", "batch"),
            donate_argnums=0,
        )
        self.program = ("train_chunk", mesh, loop, _hashable(augment))
        self.compiled = {}

    def shape(self, length: int, batch: int):
        return (1, batch) if self.loop == "python" else (length, batch)

    def compile(self, shapes, state, data, perm, key, extra=()):
        """The executables of `shapes` [(length, batch), ...] and of the `extra` programs
        [(what, lower)], compiled together (`compile_all`); returns the compiled extras."""
        todo = sorted({self.shape(*s) for s in shapes})
        inputs = signature(state, data, perm, key)
        jobs = [
            ((self.program, shape, inputs), functools.partial(self._lower, shape, state, data, perm, key))
            for shape in todo
        ]
        done = compile_all(jobs + list(extra))
        self.compiled.update(zip(todo, done))
        return done[len(todo) :]

    def _lower(self, shape, state, data, perm, key):
        return self.step.lower(state, data, perm, 0, 0, key, length=shape[0], batch=shape[1])

    def _call(self, state, data, perm, offset, step0, key, length, batch):
        exe = self.compiled.get((length, batch))
        if exe is None:
            return self.step(state, data, perm, offset, step0, key, length=length, batch=batch)
        return exe(state, data, perm, offset, step0, key)

    def __call__(self, state, data, perm, offset, step0, key, *, length, batch):
        if self.loop == "scan":
            return self._call(state, data, perm, offset, step0, key, length, batch)
        metrics = []
        for i in range(length):
            state, m = self._call(state, data, perm, offset + i * batch, step0 + i, key, 1, batch)
            metrics.append(m)
        # Joined on the host: a device concatenation would compile afresh for every call length
        # the pace picks (calls.Pace), and the caller reads them at once anyway.
        return state, jax.tree.map(lambda *a: np.concatenate(a), *jax.device_get(metrics))


# Compiled programs of this process, kept across runs (the newest 32): a notebook's second run of
# the same model, optimizer, settings and shapes compiles nothing. A program is named by what it
# is (the function and its fixed arguments: mesh, device loop, augmentation) and the signature of
# its inputs: their tree structure, which holds the train state's static fields (the Config, the
# model's `apply`, the optimizer), and every leaf's shape, dtype and sharding.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_KEEP = 32


def signature(*args):
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(
        (np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None)) for x in leaves
    )


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:  # an unhashable callable: this object only
        return ("id", id(value))


def compile_all(jobs, threads: int | None = None):
    """[(what, lower)] -> the compiled programs, in order: those this process compiled before from
    `_COMPILED`, the rest lowered and compiled `threads` at a time (XLA compiles without the GIL;
    None: as many as the platform's tuning says; the persistent compilation cache, when on, serves
    what an earlier process compiled)."""
    if threads is None:
        threads = tuning.decide(jax.default_backend()).compile_threads
    found = {i: _COMPILED.get(what) for i, (what, _) in enumerate(jobs)}
    todo = [i for i, exe in found.items() if exe is None]
    if todo:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
            for i, exe in zip(todo, pool.map(lambda i: jobs[i][1]().compile(), todo)):
                found[i] = exe
    for i, (what, _) in enumerate(jobs):
        _COMPILED[what] = found[i]
        _COMPILED.move_to_end(what)
    while len(_COMPILED) > _KEEP:
        _COMPILED.popitem(last=False)
    return [found[i] for i in range(len(jobs))]


def _evaluate(state, data: DeviceData, *, batch, mesh):
    def body(total, i):
        sl = lambda a: parallel.constrain_batch(jax.lax.dynamic_slice_in_dim(a, i * batch, batch), mesh)
        images = preprocess(sl(data.test_images), data.pixel_mean)
        m = eval_step(state, images, sl(data.test_labels), sl(data.test_weights))
        return jax.tree.map(jnp.add, total, m), None

    zero = {"loss": jnp.float32(0), "correct": jnp.float32(0), "count": jnp.float32(0)}
    total, _ = jax.lax.scan(body, zero, jnp.arange(data.test_labels.shape[0] // batch))
    return total


def make_evaluate(config, mesh):
    """jit of the test-set evaluation: summed metrics over every real test image."""
    return jax.jit(functools.partial(_evaluate, batch=eval_batch(config, mesh), mesh=mesh))


def evaluate_program(config, mesh, evaluate, state, data):
    """The evaluation as a `compile_all` job."""
    what = ("evaluate", mesh, eval_batch(config, mesh), signature(state, data))
    return what, lambda: evaluate.lower(state, data)


def abstract(tree, mesh):
    """The shapes and dtypes of `tree`'s arrays, replicated over `mesh`: what a program compiles
    for before the arrays exist (as `parallel.replicate` will place them)."""
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def call_shapes(num_train: int, config, step: int = 0) -> set:
    """(length, batch) of every device call of a whole epoch, and of an epoch from `step` on (a
    resumed run's first)."""
    plans = epoch_plan(num_train, config.batch_size, config.steps_per_call)
    plans += epoch_plan(num_train, config.batch_size, config.steps_per_call, step)
    return {(length, batch) for _, _, length, batch in plans}


def compile_epoch(chunk: TrainChunk, evaluate, config, state, data: DeviceData, data_key, shapes, epoch=0):
    """Compile the train calls of `shapes` (`call_shapes`) and `evaluate`; returns the compiled
    evaluation. `state` may be `abstract`: compiling needs only shapes."""
    n = data.train_labels.shape[0]
    key = epoch_key(data_key, epoch)
    program = evaluate_program(config, chunk.mesh, evaluate, state, data)
    (compiled,) = chunk.compile(shapes, state, data, permutation(key, n), key, extra=[program])
    return compiled


def next_call(num_train: int, batch_size: int, steps_per_call: int, step: int):
    """(offset, step, length, batch) of the device call that starts at `step` of an epoch.

    Calls end at multiples of steps_per_call (steps 0, K, 2K, ...), so a run resumed at a call
    boundary makes the same calls as one that never stopped. The partial batch is its own call.
    """
    full = num_train // batch_size
    if step < full:
        return step * batch_size, step, min(steps_per_call - step % steps_per_call, full - step), batch_size
    return full * batch_size, full, 1, num_train % batch_size


def epoch_plan(num_train: int, batch_size: int, steps_per_call: int, start_step: int = 0):
    """Every device call of one epoch (see `next_call`), from `start_step` on."""
    calls, step = [], start_step
    while step < steps_per_epoch(num_train, batch_size):
        calls.append(next_call(num_train, batch_size, steps_per_call, step))
        step += calls[-1][2]
    return calls
