"""The whole run: `train_and_evaluate`, resumable.

`train` reads top to bottom as the run's story, in named sections (as big_vision's train.py):
workdir, data, mesh, parts, state, record, compile, epochs, test. What it decides (the mesh,
the model, optimizer and augmentation, the device loop) is decided there, once, into a `Run`,
and passed down; the platform's decisions come in from the caller (`train_and_evaluate`, or a
sweep for each of its runs). Its parts live elsewhere, each in one place: the device calls of an
epoch in `call_queue`, checkpoints in `checkpoint`, everything written or printed in `writer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import time
from typing import Any

import jax
import numpy as np

from resnet_jax import checkpoint, errors, process, tuning
from resnet_jax.checkpoint import Progress, run_files
from resnet_jax.config import Config
from resnet_jax.data import load
from resnet_jax.data.dataset import Dataset, dataset_fields, pixel_mean, split_holdout
from resnet_jax.device import batches, calls, parallel, programs
from resnet_jax.device import data as device_data
from resnet_jax.device.metrics import Sums, check_finite, epoch_record
from resnet_jax.errors import Interrupted, UserError
from resnet_jax.model import parts as run_parts
from resnet_jax.model import steps
from resnet_jax.runs import interrupt
from resnet_jax.runs.console import finished_line, resume_lines, start_lines
from resnet_jax.runs.console import summary as model_summary
from resnet_jax.runs.evaluation import evaluate_on
from resnet_jax.runs.writer import Writer


def run_keys(config: Config):
    """(init key, data key) of a run: both from its seed."""
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    return init_key, data_key


def train_and_evaluate(
    config: Config,
    workdir: str,
    dataset: Dataset | None = None,
    *,
    model=None,
    optimizer=None,
    augment=None,
    callbacks=(),
    verbosity: int = 2,
    stop: threading.Event | None = None,
    summary: bool = False,
):
    """Train in `workdir` (resuming what is there); returns (state, history).

    The Config's recipe unless you bring parts (resnet_jax.parts says what each must be):
    `model` a flax.linen Module called as model(images, train=bool) -> logits; `optimizer` an
    optax GradientTransformation or a function steps_per_epoch -> one; `augment` a jit-able
    (key, images) -> images on preprocessed float batches. `dataset` may be an in-memory Dataset;
    otherwise config.dataset / config.data_dir are loaded. `callbacks` are called after each
    epoch as fn(epoch, metrics, state); one returning True ends the run there, saved and recorded
    as finished. Ctrl-C (SIGINT), or `stop` when set, ends the run after the current device call
    with the state saved and raises Interrupted; calling again resumes. `summary` prints a
    per-layer table of the model first. `verbosity` 0: silent; 1: the epoch lines; 2 (the
    default): also each epoch's progress (step, loss, accuracy, images/s, time left), redrawn in
    place in a terminal or a Jupyter notebook, a line every 30 s in a log. The first run of a
    process sets the process up (resnet_jax.process.setup: the README's "What resnet_jax changes
    in your process").
    """
    process.setup()
    kwargs = dict(model=model, optimizer=optimizer, augment=augment, callbacks=callbacks, summary=summary)
    return train(
        config, workdir, dataset, platform=process.current(), verbosity=verbosity, stop=stop, **kwargs
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """What one run is, decided at its start and handed to its parts."""

    config: Config
    path: str
    platform: tuning.Platform
    parts: run_parts.Parts
    mesh: Any
    train_set: Dataset
    held_out: np.ndarray | None  # indices of the training images held out to validate, if any
    steps_per_epoch: int
    template: steps.TrainState  # the state's shapes: what a checkpoint is restored into

    @property
    def data_key(self):
        return run_keys(self.config)[1]


def train(
    config: Config, workdir: str, dataset=None, *, platform, verbosity=2, stop=None, locked=False, **kw
):
    """`train_and_evaluate` for the `platform` decided by the caller; `locked`: the caller holds
    the workdir's lock (a sweep's run). `kw`: model, optimizer, augment, callbacks, summary."""
    path = os.path.abspath(os.path.expanduser(workdir))
    writer = Writer(path, verbosity)
    console, stop = writer.console, stop if stop is not None else threading.Event()
    with checkpoint.resumable_on_full_disk(path), contextlib.ExitStack() as stack:
        stack.enter_context(interrupt.saving_on(stop, end_bar=console.bar))  # Ctrl-C: save, stop
        # -- Workdir: one run at a time, holding only resnet_jax's own files.
        run_files.refuse_a_sweep(path)
        stack.enter_context(writer.claim(locked))

        # -- Data: the test set validates (the seed's way), or a held-out part of the training set.
        if dataset is None:
            dataset = load.for_config(config, verbose=console.verbosity > 0)
        config = dataclasses.replace(config, **dataset_fields(dataset))
        train_set, held_out = dataset, None
        if config.val_split:
            train_set, held_out = split_holdout(dataset, config.val_split, config.seed)

        # -- Mesh: the devices this run's model is worth (the run's decision, in any process); the
        # platform's advice when JAX started before its settings.
        for line in filter(
            None, (process.note(), parallel.advice(config, train_set.image_shape, kw.get("model")))
        ):
            console.line(line)
        mesh = parallel.run_mesh(platform, config, train_set.image_shape, kw.get("model"))
        steps_per_epoch = _steps_per_epoch(config, train_set, mesh)

        # -- Parts: the model, the optimizer and the augmentation (yours, else the Config's).
        own = {k: kw.get(k) for k in ("model", "optimizer", "augment")}
        parts = run_parts.resolve(config, train_set.image_shape, steps_per_epoch, platform, **own)
        template = checkpoint.template(parts.model, parts.tx, config, train_set.image_shape)
        run = Run(config, path, platform, parts, mesh, train_set, held_out, steps_per_epoch, template)
        stack.enter_context(errors.out_of_memory_as(config, parts.record["model"]["name"], mesh))
        compiled = stack.enter_context(programs.Programs(run, console))
        on_devices = functools.cache(lambda: _to_devices(run))

        # -- State: the workdir's latest checkpoint (same model, data and seed), else a new one,
        # whose programs compile meanwhile where the platform gains from it (from the shapes).
        ckpts = stack.enter_context(checkpoint.Checkpoints(path, save_thread=platform.save_thread))
        if platform.compile_early and not checkpoint.exists(path):
            compiled.begin(on_devices())
        data = run_files.describe_data(dataset, config, held_out)  # its fingerprint hashes meanwhile
        start = _start(run, ckpts, data, writer.primary)
        state, progress = start.state, start.progress

        # -- Record and report: run.json, metrics.jsonl, what will run.
        info = run_files.run_info(
            start.saved,
            config,
            train_set,
            steps_per_epoch,
            data=data,
            parts=parts.record,
            tree=checkpoint.state_tree(template),
            change=progress.change_record(start.changed) if start.changed else None,
            finished=progress.finished(config.epochs),
            devices=parallel.describe(mesh),
        )
        for line in start_lines(config, data, parts, mesh, steps_per_epoch, path):
            console.line(line)
        if kw.get("summary"):
            console.line(model_summary(parts.model, data["image_shape"]))
        if progress.finished(config.epochs):  # nothing to train, nothing to write
            console.line(finished_line(path, progress, info.get("test")))
            return state, list(progress.history)
        writer.run_json(info)
        writer.history(progress.history)
        writer.holdout(held_out)
        for line in resume_lines(path, progress, steps_per_epoch, start.changed) if start.saved else ():
            console.line(line)

        # -- Compile: the dataset on the devices, every train-call shape and the evaluation.
        state = parallel.replicate(jax.device_get(state), mesh)
        evaluate = compiled.finish(state, on_devices(), progress)

        # -- Epochs: device calls of many steps, an evaluation, the callbacks, a checkpoint.
        writer.start_epochs(() if parts.record["optimizer"]["own"] else config.lr_epochs)
        stack.callback(writer.close)
        epochs = Epochs(run, compiled.call, evaluate, on_devices(), stop, ckpts, writer)
        for epoch in range(progress.epoch + 1, config.epochs + 1):
            lr = parts.rate(state, epoch)
            console.epoch_start(epoch, config.epochs, lr)
            began, first = time.monotonic(), progress.step_in_epoch
            state, sums, step = epochs.train(state, epoch, progress)
            if step < steps_per_epoch:  # a stop request, mid-epoch: saved, to go on from this step
                stopped = progress.stopped_mid_epoch(step, sums, time.monotonic() - began)
                ckpts.save(state, stopped.to_meta(), rank=None)
                console.end_bar()
                raise Interrupted(f"at epoch {epoch}, step {step}/{steps_per_epoch}", ckpts.path)
            # the evaluation included, and the part of the epoch run before a resume
            record = epochs.record(state, epoch, lr, sums, began - progress.partial_seconds)
            stopping = _callbacks_stop(kw.get("callbacks", ()), epoch, state, record)
            ran = steps_per_epoch if progress.partial_seconds else steps_per_epoch - first
            progress = epochs.save(state, progress, record, stopping, steps_run=ran)
            if stopping:
                console.line(f"Stopped by a callback after epoch {epoch}; the run is finished.")
                break
            if stop.is_set() and epoch < config.epochs:
                raise Interrupted(f"after epoch {epoch}", ckpts.path)
        ckpts.wait()  # the outputs of the last saved epoch follow its checkpoint

        # -- Test: the seed reports the final model on the test set (its last validation); with a
        # held-out split the test set is touched here, once.
        if held_out is None:
            last = progress.history[-1]
            test = Sums(loss=last["val_loss"], correct=last["val_acc"], count=1.0)
        else:
            test = evaluate_on(state, dataset, config, mesh)
        console.test_result(test.mean_loss, test.accuracy)
        writer.run_json(run_files.finished(info, test, progress, int(jax.device_get(state.step))))
        return state, list(progress.history)


def _to_devices(run: Run) -> device_data.DeviceData:
    """The run's data on every device (checked to fit first); its pixel mean is the one a
    checkpoint of this data holds."""
    errors.check_data_fits(device_data.device_bytes(run.train_set, run.config, run.mesh), run.mesh)
    mean = pixel_mean(run.train_set.train_images)
    return device_data.to_device(run.train_set, mean, run.config, run.mesh)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: a new state, or the workdir's latest checkpoint."""

    state: Any
    progress: Progress
    saved: tuple | None  # (config, run.json) of the run found in the workdir, else None
    changed: dict  # the settings that differ from the saved run's: {field: [saved, now]}


def _start(run: Run, ckpts, data: dict, primary: bool) -> Start:
    """Refuse another model, data, seed or split before any checkpoint is touched; then the latest
    readable checkpoint (unreadable newer ones set aside by process 0), or a new state."""
    saved = run_files.read_run(run.path) if checkpoint.exists(run.path) else None
    changed = run_files.check_resume(saved, run.config, data, run.path)
    if saved is not None:
        checkpoint.check_tree(saved[1], checkpoint.state_tree(run.template), run.path)
    if run.held_out is not None:
        run_files.check_holdout(run.path, run.held_out)
    restored = ckpts.restore(run.template, "latest", set_aside_damaged=primary) if saved else None
    if restored is not None:
        return Start(restored[0], Progress.from_meta(restored[1]), saved, changed)
    init_key = run_keys(run.config)[0]
    with process.compiling():
        state = steps.init_state(
            run.parts.model, run.parts.tx, run.config, init_key, run.train_set.image_shape
        )
    state = state.replace(pixel_mean=jax.numpy.asarray(pixel_mean(run.train_set.train_images)))
    return Start(state, Progress(), saved, changed)


class Epochs:
    """An epoch's work, from wherever the run stands (`Progress`): its device calls
    (`calls.run`) with each call's metrics summed, checked for NaN and shown on the progress
    bar; then the evaluation, its record, and the checkpoint its outputs follow."""

    def __init__(self, run: Run, call, evaluate, data, stop, ckpts, writer: Writer):
        self.run, self.call, self.evaluate, self.data = run, call, evaluate, data
        self.stop, self.ckpts, self.writer = stop, ckpts, writer
        self.pace = calls.Pace(call.loop, run.config.steps_per_call)
        self.val_on = "held-out" if run.held_out is not None else "test"

    def train(self, state, epoch: int, progress: Progress):
        """(state, summed metrics, the step reached): below steps_per_epoch after a stop."""
        n, batch_size, total = (
            len(self.run.train_set.train_labels),
            self.run.config.batch_size,
            self.run.steps_per_epoch,
        )
        key = batches.epoch_key(self.run.data_key, epoch - 1)
        perm = batches.permutation(key, n)
        sums, began = progress.partial, time.monotonic()

        def call(state, offset, step, length, batch):
            return self.call(state, self.data, perm, offset, step, key, length=length, batch=batch)

        def on_metrics(metrics, step, length):
            nonlocal sums
            self.ckpts.poll()  # the last epoch's outputs, once its checkpoint is on disk
            check_finite(metrics, epoch, step, total, self.ckpts)
            sums = sums.add(metrics)
            self.writer.console.progress(
                step + length, total, sums, began, progress.step_in_epoch, self.run.config.batch_size
            )

        plan = lambda step, k: batches.next_call(n, batch_size, k, step)
        state, step = calls.run(
            state, call, plan, progress.step_in_epoch, total, self.pace, self.stop, on_metrics
        )
        return state, sums, step

    def record(self, state, epoch: int, lr, sums: Sums, began: float) -> dict:
        """metrics.jsonl's line for the epoch, its evaluation included."""
        val = Sums().add(jax.device_get(self.evaluate(state, self.data)))
        return epoch_record(epoch, lr, sums, val, self.val_on, time.monotonic() - began)

    def save(self, state, progress: Progress, record: dict, stopping: bool, steps_run: int) -> Progress:
        """The epoch's checkpoint (a candidate for best when val_acc strictly improved), its line on
        the console; metrics.jsonl, TensorBoard and curves.png follow once the checkpoint is on
        disk, so they never list an epoch that a restart would redo."""
        best_before = progress.best_val_acc
        progress, improved = progress.epoch_done(record, stopped=stopping)
        then = functools.partial(self.writer.epoch, record, progress.history)
        self.ckpts.save(state, progress.to_meta(), rank=record["epoch"] if improved else -1, then=then)
        console, total = self.writer.console, self.run.steps_per_epoch
        console.epoch_end(total, record, best_before, improved, self.ckpts.path, steps_run=steps_run)
        return progress


def _steps_per_epoch(config: Config, train_set: Dataset, mesh) -> int:
    n = len(train_set.train_images)
    if config.batch_size > n:
        raise UserError(
            f"batch_size {config.batch_size} is larger than the {n} training images; "
            f"use --batch_size {n} or less"
        )
    parallel.check_batch_size(config.batch_size, mesh)
    return batches.steps_per_epoch(n, config.batch_size)


def _callbacks_stop(callbacks, epoch: int, state, record: dict) -> bool:
    """Call every callback; True when one returned True (process 0's decision, on every process)."""
    stopping = False
    for fn in callbacks:
        stopping = (fn(epoch, dict(record), state) is True) or stopping
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stopping = bool(multihost_utils.broadcast_one_to_all(np.asarray(stopping)))
    return stopping
