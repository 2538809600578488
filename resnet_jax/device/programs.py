"""The run's device programs and the process's cache of compiled ones.

- `TrainCall`: a device call of many train steps, gathering each batch from the data on the
  devices with the augmentation inside jit: one jitted `lax.scan` (the "scan" loop), or one
  jitted step a batch dispatched asynchronously (the "python" loop; see resnet_jax.tuning).
- `make_evaluate`: the test-set evaluation, one device call over the padded, masked test set.
- `compile_all`: compiles programs, a few at a time, each once in a process: a notebook's
  second run of the same model, optimizer, settings and shapes compiles nothing.
- `Programs`: a run's compiled programs, begun early where the platform gains from it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import process
from resnet_jax.config import program_config
from resnet_jax.device import batches, parallel
from resnet_jax.device import data as device_data
from resnet_jax.device.batches import chunk_rows, epoch_key, permutation
from resnet_jax.device.data import DeviceData, eval_batch
from resnet_jax.model.augment import augment as seed_augment
from resnet_jax.model.steps import eval_step, preprocess, train_step


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

    if length == 1:  # no while loop at all (the python loop's call)
        state, m = body(state, (rows[0], keys[0]))
        return state, jax.tree.map(lambda a: a[None], m)
    return jax.lax.scan(body, state, (rows, keys))


class TrainCall:
    """A device call of `length` train steps (a chunk of an epoch: `_train_chunk`):
    f(state, data, perm, offset, step0, key, *, length, batch) -> (state, per-step metrics of
    shape [length]); the state is donated. `augment(key, images)` augments each batch (None: the
    seed's shift + flip with the state's Config).

    `loop` "scan": one jitted lax.scan; "python": one jitted step per batch, dispatched
    asynchronously, the call returning once its last step is done with its metrics on the host
    (XLA:CPU runs convolution gradients inside a while loop about 15x slower than outside one).
    Keeps one compiled executable per (length, batch) shape (`compile`)."""

    def __init__(self, mesh, loop: str, augment=None):
        if loop not in ("scan", "python"):
            raise ValueError(f"loop must be scan or python (the platform resolves auto), got {loop!r}")
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

    def compile(self, shapes, state, data, perm, key, *, threads: int, extra=()):
        """The executables of `shapes` [(length, batch), ...] and of the `extra` programs
        [(what, lower)], compiled together (`compile_all`); returns the compiled extras."""
        state = for_programs(state)
        todo = sorted({self.shape(*s) for s in shapes})
        inputs = signature(state, data, perm, key)
        jobs = [
            ((self.program, shape, inputs), functools.partial(self._lower, shape, state, data, perm, key))
            for shape in todo
        ]
        done = compile_all(jobs + list(extra), threads)
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
        config, state = state.config, for_programs(state)
        if self.loop == "scan":
            state, metrics = self._call(state, data, perm, offset, step0, key, length, batch)
            return state.replace(config=config), metrics
        metrics = []
        for i in range(length):
            state, m = self._call(state, data, perm, offset + i * batch, step0 + i, key, 1, batch)
            metrics.append(m)
        # Joined on the host: a device concatenation would compile afresh for every call length
        # the pace picks (call_queue.Pace), and the caller reads them at once anyway.
        return state.replace(config=config), jax.tree.map(
            lambda *a: np.concatenate(a), *jax.device_get(metrics)
        )


# Compiled programs of this process, kept across runs (the newest 32). A program is named by what
# it is (the function and its fixed arguments: mesh, device loop, augmentation) and the signature
# of its inputs: their tree structure, which holds the train state's static fields (the Config,
# the model's `apply`, the optimizer), and every leaf's shape, dtype and sharding.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_KEEP = 32


def for_programs(state):
    """The state as the programs take it: its Config reduced to what they read
    (config.program_config), so that runs differing only in the rest (their seed, epochs, rate
    schedule, ...) share one compiled program. The caller's state keeps its Config."""
    return state.replace(config=program_config(state.config))


def for_evaluation(state):
    """The state as the evaluation takes it: `for_programs`'s, without the optimizer (its
    transformation and its state), which the evaluation never reads: runs of one model that
    differ only in their optimizer (another learning rate, another schedule) share one compiled
    evaluation, and the call does not pass the optimizer's arrays."""
    return for_programs(state).replace(tx=None, opt_state=None)


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


def compile_all(jobs, threads: int):
    """[(what, lower)] -> the compiled programs, in order: those this process compiled before, the
    rest lowered and compiled `threads` at a time (XLA compiles without the GIL; the platform
    says how many: resnet_jax.tuning); the persistent compilation cache, when on, serves what an
    earlier process compiled."""
    found = {i: _COMPILED.get(what) for i, (what, _) in enumerate(jobs)}
    todo = [i for i, exe in found.items() if exe is None]
    if todo:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
            for i, exe in zip(todo, pool.map(lambda i: _compile(jobs[i][1]), todo)):
                found[i] = exe
    for i, (what, _) in enumerate(jobs):
        _COMPILED[what] = found[i]
        _COMPILED.move_to_end(what)
    while len(_COMPILED) > _KEEP:
        _COMPILED.popitem(last=False)
    return [found[i] for i in range(len(jobs))]


def _compile(lower):
    lowered = lower()
    with process.compiling_as_alone():  # a pinned worker's program is the run alone's
        return lowered.compile()


def compiled(kind: str | None = None) -> dict:
    """The programs this process keeps compiled, {what: executable} (`kind`: "train_chunk" for
    the train calls, or "evaluate", only): what a notebook's next run reuses."""
    return {what: exe for what, exe in _COMPILED.items() if kind is None or what[0][0] == kind}


def forget() -> None:
    """Drop the compiled programs this process keeps (their memory; the next run compiles, or
    reads the persistent compilation cache)."""
    _COMPILED.clear()


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


class Evaluation:
    """A compiled evaluation, called with any state of its shapes (`for_evaluation` applied)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, state, data):
        return self.compiled(for_evaluation(state), data)


def evaluate_program(config, mesh, evaluate, state, data):
    """The evaluation as a `compile_all` job (its result: call it through `Evaluation`)."""
    state = for_evaluation(state)
    what = (("evaluate",), mesh, eval_batch(config, mesh), signature(state, data))
    return what, lambda: evaluate.lower(state, data)


def compile_epoch(
    call: TrainCall, evaluate, config, state, data: DeviceData, data_key, shapes, *, threads, epoch=0
):
    """Compile the train calls of `shapes` (batches.call_shapes) and `evaluate`; returns the
    compiled evaluation. `state` may be abstract (device_data.abstract): compiling needs shapes."""
    n = data.train_labels.shape[0]
    key = epoch_key(data_key, epoch)
    program = evaluate_program(config, call.mesh, evaluate, state, data)
    (done,) = call.compile(shapes, state, data, permutation(key, n), key, threads=threads, extra=[program])
    return Evaluation(done)


class Programs:
    """The run's compiled programs: its train call for every call shape and the evaluation
    (`programs.compile_epoch`), each compiled once in a process (from the persistent compilation
    cache what an earlier process compiled). `begin` starts a new run's compile on a thread from
    the state's shapes while the state is initialised (Platform.compile_early); `finish` compiles
    what is left and returns the compiled evaluation. A context manager: leaving waits for a
    compile still running."""

    def __init__(self, run, console):
        self.run, self.console = run, console
        own_augment = run.parts.augment if run.parts.record["augment"]["own"] else None  # None: the Config's
        self.call = TrainCall(run.mesh, run.platform.loop(run.config.device_loop), own_augment)
        self.evaluate = make_evaluate(run.config, run.mesh)
        self.early, self.pool = None, None
        self.warnings = contextlib.ExitStack()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.warnings.close()

    def begin(self, data):
        """Compile a new run's programs on a thread, from the state's shapes."""
        shapes = batches.call_shapes(data.train_labels.shape[0], self.run.config)
        # JAX's cache warnings from the thread are collected until `finish` (process.compiling;
        # warnings are process-wide, so only this thread enters and leaves the collection).
        self.warnings.enter_context(process.compiling())
        state = device_data.abstract(self.run.template, self.run.mesh)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self.early = (shapes, time.monotonic(), self.pool.submit(self._compile, state, data, shapes))

    def _compile(self, state, data, shapes, epoch: int = 0):
        run = self.run
        return compile_epoch(
            self.call,
            self.evaluate,
            run.config,
            state,
            data,
            run.data_key,
            shapes,
            threads=run.platform.compile_threads,
            epoch=epoch,
        )

    def finish(self, state, data, progress):
        """The compiled evaluation, once every train-call shape of the run is compiled too."""
        shapes = batches.call_shapes(data.train_labels.shape[0], self.run.config, progress.step_in_epoch)
        count = len({self.call.shape(*s) for s in shapes})
        shapes_text = f"{count:,} call shape{'' if count == 1 else 's'}"
        self.console.line(f"Compiling the train step ({shapes_text}) and the evaluation...")
        began = time.monotonic()
        with self.warnings, process.compiling():
            if self.early is None:
                compiled = self._compile(state, data, shapes, progress.epoch)
                self.console.line(f"Compiled in {time.monotonic() - began:.1f} s.")
                return compiled
            done, since, future = self.early
            compiled = future.result()
            if shapes - done:  # not for a new run, which starts at step 0
                compiled = self._compile(state, data, shapes, progress.epoch)
        waited = time.monotonic() - began
        self.console.line(
            f"Compiled in {time.monotonic() - since:.1f} s, begun with the state ({waited:.1f} s waited)."
        )
        return compiled
