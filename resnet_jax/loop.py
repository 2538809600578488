"""The whole run: `train_and_evaluate`, resumable.

It reads top to bottom as the run's story, in named sections (as big_vision's train.py):
workdir, data, platform, parts, state, record, compile, epochs, test. What it decides (the
mesh, the model, optimizer and augmentation, the device loop) is decided there, once, and
passed down. Its parts live elsewhere, each in one place: the device calls of an epoch in
`calls`, checkpoints in `checkpoint`, everything written or printed in `writer`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import threading
import time
from typing import Any

import jax
import numpy as np

from resnet_jax import (
    cache,
    calls,
    checkpoint,
    faults,
    interrupt,
    many,
    parallel,
    parts,
    pipeline,
    steps,
    tuning,
)
from resnet_jax import workdir as wd
from resnet_jax.checkpoint import Progress, Sums
from resnet_jax.config import Config
from resnet_jax.data import load_dataset
from resnet_jax.dataset import Dataset, pixel_mean, split_holdout
from resnet_jax.errors import Interrupted, UserError
from resnet_jax.evaluation import evaluate_on
from resnet_jax.report import finished_line, plural, resume_lines, start_lines
from resnet_jax.report import summary as model_summary
from resnet_jax.writer import RunWriter


class NonFinite(UserError):
    """The loss became NaN or infinite."""


def keys(config: Config):
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
    verbosity: int = 1,
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
    as finished. `stop`, when set, ends the run after the current device call with the state
    saved (raises Interrupted). `summary` prints a per-layer table of the model first.
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    # First, before JAX starts: on a CPU malloc set up, and the split of cores into devices that
    # train.py would make for this model (tuning.py); nothing once JAX has started.
    tuning.split_for(config, dataset.image_shape if dataset is not None else (32, 32, 3), model)
    platform = tuning.started()
    out = RunWriter(path, verbosity)
    console, stop = out.console, stop or threading.Event()
    with checkpoint.resumable_on_full_disk(path), contextlib.ExitStack() as stack:
        stack.enter_context(interrupt.saving_on(stop, end_bar=console.bar))  # Ctrl-C: save, stop
        # -- Workdir: one run at a time, holding only resnet_jax's own files.
        many.refuse_single_run(path)
        stack.enter_context(out.claim())

        # -- Data: the test set validates (the seed's way), or a held-out part of the training set.
        if dataset is None:
            dataset = load_dataset(config.dataset, config.data_dir, verbose=console.verbosity > 0)
        config = dataclasses.replace(config, num_classes=dataset.num_classes, dataset=dataset.name)
        train_set, held = dataset, None
        if config.val_split:
            train_set, held = split_holdout(dataset, config.val_split, config.seed)

        # -- Platform: its settings (decided above), the mesh over every device, the steps of an epoch.
        if (hint := tuning.advice(config)) is not None:
            console.line(hint)
        mesh = parallel.make_mesh()
        spe = _steps_per_epoch(config, train_set, mesh)

        # -- Parts: the model, the optimizer and the augmentation (yours, else the Config's).
        chosen = parts.resolve(
            config, train_set.image_shape, spe, platform, model=model, optimizer=optimizer, augment=augment
        )
        template = checkpoint.template(chosen.model, chosen.tx, config, train_set.image_shape)
        stack.enter_context(faults.out_of_memory_as(config, chosen.record["model"]["name"], mesh))
        own_augment = chosen.augment if chosen.record["augment"]["own"] else None  # None: the Config's
        chunk = pipeline.make_train_chunk(mesh, config.device_loop, own_augment)
        data_key = keys(config)[1]
        programs = Programs(chunk, pipeline.make_evaluate(config, mesh), config, data_key, console)
        stack.callback(programs.close)

        # -- State: the workdir's latest checkpoint (same model, data and seed), else a new one,
        # whose programs compile meanwhile where the platform gains from it (from the shapes).
        ckpts = stack.enter_context(checkpoint.Checkpoints(path, save_thread=platform.save_thread))
        device_data = None
        if platform.compile_early and not checkpoint.exists(path):
            faults.check_data_fits(pipeline.device_bytes(train_set, config, mesh), mesh)
            device_data = pipeline.to_device(train_set, pixel_mean(train_set.train_images), config, mesh)
            programs.begin(pipeline.abstract(template, mesh), device_data)
        data = wd.describe_data(dataset, config, held)  # its fingerprint hashes while they compile
        start = _start(path, ckpts, chosen, config, data, train_set, held, template, out.primary)
        state, progress = start.state, start.progress

        # -- Record and report: run.json, metrics.jsonl, what will run.
        info = wd.run_info(
            start.saved,
            config,
            train_set,
            spe,
            data=data,
            parts=chosen.record,
            tree=checkpoint.state_tree(template),
            change=progress.change_record(start.changed) if start.changed else None,
            finished=progress.finished(config.epochs),
        )
        out.run_json(info)
        out.history(progress.history)
        out.holdout(held)
        for line in start_lines(config, data, chosen.record, mesh, spe, path):
            console.line(line)
        if summary:
            console.line(model_summary(chosen.model, data["image_shape"]))
        if progress.finished(config.epochs):
            console.line(finished_line(path, progress, info.get("test")))
            return state, list(progress.history)
        for line in resume_lines(path, progress, spe, start.changed) if start.saved else ():
            console.line(line)

        # -- Compile: the dataset on the devices, every train-call shape and the evaluation.
        state = parallel.replicate(jax.device_get(state), mesh)
        if device_data is None:
            faults.check_data_fits(pipeline.device_bytes(train_set, config, mesh), mesh)
            device_data = pipeline.to_device(train_set, np.asarray(state.pixel_mean), config, mesh)
        evaluate = programs.finish(state, device_data, progress)

        # -- Epochs: device calls of many steps, an evaluation, the callbacks, a checkpoint.
        out.start_epochs(() if chosen.record["optimizer"]["own"] else config.lr_epochs)
        stack.callback(out.close)
        val_on = "held-out" if held is not None else "test"
        epochs = Epochs(chunk, evaluate, device_data, data_key, spe, config, stop, ckpts, out, val_on)
        for epoch in range(progress.epoch + 1, config.epochs + 1):
            lr = chosen.rate(state, epoch)
            console.epoch_start(epoch, config.epochs, lr)
            began, first = time.monotonic(), progress.step_in_epoch
            state, sums, step = epochs.train(state, epoch, progress)
            if step < spe:  # a stop request, mid-epoch: saved, to go on from this step
                ckpts.save(state, progress.stopped_mid_epoch(step, sums).to_meta(), rank=None)
                console.end_bar()
                raise Interrupted(f"at epoch {epoch}, step {step}/{spe}", ckpts.path)
            rec = epochs.record(state, epoch, lr, sums, began)  # the evaluation included
            stopping = _callbacks_stop(callbacks, epoch, state, rec)
            progress = epochs.save(state, progress, rec, stopping, steps_run=spe - first)
            if stopping:
                console.line(f"Stopped by a callback after epoch {epoch}; the run is finished.")
                break
            if stop.is_set() and epoch < config.epochs:
                raise Interrupted(f"after epoch {epoch}", ckpts.path)
        ckpts.wait()  # the outputs of the last saved epoch follow its checkpoint

        # -- Test: the seed reports the final model on the test set (its last validation); with a
        # held-out split the test set is touched here, once.
        if held is None:
            last = progress.history[-1]
            test = Sums(loss=last["val_loss"], correct=last["val_acc"], count=1.0)
        else:
            test = evaluate_on(state, dataset, config, mesh)
        console.test_result(test.mean_loss, test.accuracy)
        out.run_json(wd.finished(info, test, progress, int(jax.device_get(state.step))))
        return state, list(progress.history)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: a new state, or the workdir's latest checkpoint."""

    state: Any
    progress: Progress
    saved: tuple | None  # (config, run.json) of the run found in the workdir, else None
    changed: dict  # the settings that differ from the saved run's: {field: [saved, now]}


def _start(path, ckpts, chosen, config, data, train_set, held, template, primary) -> Start:
    """Refuse another model, data, seed or split before any checkpoint is touched; then the latest
    readable checkpoint (unreadable newer ones set aside by process 0), or a new state."""
    saved = wd.read_run(path) if checkpoint.exists(path) else None
    changed = wd.check_resume(saved, config, data, path)
    if saved is not None:
        checkpoint.check_tree(saved[1], checkpoint.state_tree(template), path)
    if held is not None:
        wd.check_holdout(path, held)
    restored = ckpts.restore(template, "latest", set_aside_damaged=primary) if saved else None
    if restored is not None:
        return Start(restored[0], Progress.from_meta(restored[1]), saved, changed)
    with cache.compiling():
        state = steps.init_state(chosen.model, chosen.tx, config, keys(config)[0], train_set.image_shape)
    state = state.replace(pixel_mean=jax.numpy.asarray(pixel_mean(train_set.train_images)))
    return Start(state, Progress(), saved, changed)


class Epochs:
    """An epoch's work, from wherever the run stands (`Progress`): its device calls
    (`calls.run`) with each call's metrics summed, checked for NaN and shown on the progress bar;
    then the evaluation, its record, and the checkpoint its outputs follow."""

    def __init__(self, chunk, evaluate, data, data_key, spe: int, config: Config, stop, ckpts, out, val_on):
        self.chunk, self.evaluate, self.data, self.data_key, self.spe = chunk, evaluate, data, data_key, spe
        self.batch_size, self.stop, self.ckpts, self.out, self.val_on = (
            config.batch_size,
            stop,
            ckpts,
            out,
            val_on,
        )
        self.n = data.train_labels.shape[0]
        self.pace = calls.Pace(chunk.loop, config.steps_per_call)

    def train(self, state, epoch: int, progress: Progress):
        """(state, summed metrics, the step reached): below steps_per_epoch after a stop."""
        key = pipeline.epoch_key(self.data_key, epoch - 1)
        perm = pipeline.permutation(key, self.n)
        sums, began = progress.partial, time.monotonic()

        def call(state, offset, step, length, batch):
            return self.chunk(state, self.data, perm, offset, step, key, length=length, batch=batch)

        def on_metrics(metrics, step, length):
            nonlocal sums
            self.ckpts.poll()  # the last epoch's outputs, once its checkpoint is on disk
            _check_finite(metrics, epoch, step, self.spe, self.ckpts)
            sums = sums.add(metrics)
            self.out.console.progress(step + length, self.spe, sums, began)

        plan = lambda step, k: pipeline.next_call(self.n, self.batch_size, k, step)
        state, step = calls.run(
            state, call, plan, progress.step_in_epoch, self.spe, self.pace, self.stop, on_metrics
        )
        return state, sums, step

    def record(self, state, epoch: int, lr, sums: Sums, began: float) -> dict:
        """metrics.jsonl's line for the epoch, its evaluation included."""
        val = Sums().add(jax.device_get(self.evaluate(state, self.data)))
        return epoch_record(epoch, lr, sums, val, self.val_on, time.monotonic() - began)

    def save(self, state, progress: Progress, rec: dict, stopping: bool, steps_run: int) -> Progress:
        """The epoch's checkpoint (a candidate for best when val_acc strictly improved), its line on
        the console; metrics.jsonl, TensorBoard and curves.png follow once the checkpoint is on
        disk, so they never list an epoch that a restart would redo."""
        best_before = progress.best_val_acc
        progress, improved = progress.epoch_done(rec, stopped=stopping)
        then = functools.partial(self.out.epoch, rec, progress.history)
        self.ckpts.save(state, progress.to_meta(), rank=rec["epoch"] if improved else -1, then=then)
        self.out.console.epoch_end(self.spe, rec, best_before, improved, self.ckpts.path, steps_run=steps_run)
        return progress


def epoch_record(epoch, lr, sums: Sums, val: Sums, val_on: str, seconds: float) -> dict:
    """metrics.jsonl's line for an epoch."""
    return {
        "epoch": epoch,
        "lr": lr,
        "loss": sums.mean_loss,
        "acc": sums.accuracy,
        "val_loss": val.mean_loss,
        "val_acc": val.accuracy,
        "val_on": val_on,
        "seconds": seconds,
    }


def _steps_per_epoch(config: Config, train_set: Dataset, mesh) -> int:
    n = len(train_set.train_images)
    if config.batch_size > n:
        raise UserError(
            f"batch_size {config.batch_size} is larger than the {n} training images; "
            f"use --batch_size {n} or less"
        )
    parallel.check_batch_size(config.batch_size, mesh)
    return pipeline.steps_per_epoch(n, config.batch_size)


def _callbacks_stop(callbacks, epoch: int, state, rec: dict) -> bool:
    """Call every callback; True when one returned True (process 0's decision, on every process)."""
    stopping = False
    for fn in callbacks:
        stopping = (fn(epoch, dict(rec), state) is True) or stopping
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stopping = bool(multihost_utils.broadcast_one_to_all(np.asarray(stopping)))
    return stopping


class Programs:
    """The run's compiled programs: every train-call shape and the evaluation
    (`pipeline.compile_epoch`), each compiled once in a process (from the persistent compilation
    cache what an earlier process compiled). `begin` starts a new run's compile on a thread from
    the state's shapes while the state is initialised (tuning.Tuning.compile_early); `finish`
    compiles what is left and returns the compiled evaluation."""

    def __init__(self, chunk, evaluate, config: Config, data_key, console):
        self.chunk, self.evaluate, self.config, self.data_key, self.console = (
            chunk,
            evaluate,
            config,
            data_key,
            console,
        )
        self.early, self.pool = None, None
        self.warnings = contextlib.ExitStack()

    def begin(self, state, data):
        """Compile a new run's programs on a thread; `state` abstract (pipeline.abstract)."""
        shapes = pipeline.call_shapes(data.train_labels.shape[0], self.config)
        # JAX's cache warnings from the thread are collected until `finish` (cache.compiling;
        # warnings are process-wide, so only this thread enters and leaves the collection).
        self.warnings.enter_context(cache.compiling())
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self.early = (shapes, time.monotonic(), self.pool.submit(self._compile, state, data, shapes))

    def _compile(self, state, data, shapes, epoch: int = 0):
        args = (self.chunk, self.evaluate, self.config, state, data, self.data_key, shapes, epoch)
        return pipeline.compile_epoch(*args)

    def finish(self, state, data, progress: Progress):
        """The compiled evaluation, once every train-call shape of the run is compiled too."""
        shapes = pipeline.call_shapes(data.train_labels.shape[0], self.config, progress.step_in_epoch)
        count = len({self.chunk.shape(*s) for s in shapes})
        self.console.line(f"Compiling the train step ({plural(count, 'call shape')}) and the evaluation...")
        began = time.monotonic()
        with self.warnings, cache.compiling():
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

    def close(self):
        """Wait for a compile still running (the run ended before `finish`)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.warnings.close()


def _check_finite(m, epoch, step0, spe, ckpts):
    bad = np.flatnonzero(~np.isfinite(m["loss"]))
    if bad.size:
        saved = ckpts.steps()
        advice = (
            f"the last good checkpoint (step {saved[-1]}) in {ckpts.path} is intact: rerun "
            "with a lower --learning_rate to resume from it"
            if saved
            else "no checkpoint was saved yet: rerun with a lower --learning_rate"
        )
        raise NonFinite(
            f"loss became {m['loss'][bad[0]] / m['count'][bad[0]]} at epoch {epoch}, "
            f"step {step0 + bad[0] + 1}/{spe}; stopped without saving it; {advice}"
        )
