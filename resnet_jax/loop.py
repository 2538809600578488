"""The whole run: train_and_evaluate (resumable), evaluate_checkpoint, restore."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time

import jax
import numpy as np

from resnet_jax import checkpoint, parallel, pipeline, report, steps, tuning
from resnet_jax import workdir as wd
from resnet_jax.config import Config
from resnet_jax.data import Dataset, load_dataset, pixel_mean
from resnet_jax.errors import Interrupted, UserError
from resnet_jax.optim import lr_for_epoch
from resnet_jax.progress import Progress, Sums


class NonFinite(UserError):
    """The loss became NaN or infinite."""


def keys(config: Config):
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    return init_key, data_key


def _is_primary() -> bool:
    return jax.process_index() == 0


def train_and_evaluate(
    config: Config,
    workdir: str,
    dataset: Dataset | None = None,
    *,
    verbosity: int = 1,
    stop: threading.Event | None = None,
):
    """Train `config` in `workdir` (resuming what is there); returns (state, history).

    `dataset` may be an in-memory Dataset; otherwise config.dataset is loaded. `stop`, when set,
    ends the run after the current device call with the state saved (raises Interrupted).
    """
    path = wd.prepare(workdir)
    console = report.Console(verbosity if _is_primary() else 0)
    with wd.Lock(path, enabled=_is_primary()):  # one lock per run, held by process 0
        if dataset is None:
            dataset = load_dataset(config.dataset, config.data_dir)
        config = dataclasses.replace(config, num_classes=dataset.num_classes)
        if (hint := tuning.advice(config)) is not None:
            console.line(hint)
        return _run(config, path, dataset, console, stop or threading.Event())


def _check(config: Config, path: str, dataset: Dataset):
    """Everything checked before training starts: batch size, devices, workdir compatibility."""
    n = len(dataset.train_images)
    if config.batch_size > n:
        raise UserError(
            f"batch_size {config.batch_size} is larger than the {n} training images; "
            f"use --batch_size {n} or less"
        )
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    saved = wd.read_run(path)
    if saved is not None:
        wd.check_compatible(saved[0], config, path)
    return mesh, pipeline.steps_per_epoch(n, config.batch_size)


def _run(config, path, dataset, console, stop):
    mesh, spe = _check(config, path, dataset)
    ckpts = checkpoint.Checkpoints(path)
    try:
        return _resume(config, path, dataset, console, stop, mesh, spe, ckpts)
    finally:
        ckpts.close()


def _resume(config, path, dataset, console, stop, mesh, spe, ckpts):
    init_key, data_key = keys(config)
    template = steps.create_train_state(config, init_key, dataset.image_shape, spe)
    template = template.replace(pixel_mean=jax.numpy.asarray(pixel_mean(dataset.train_images)))
    restored = ckpts.restore(template, "latest")
    if _is_primary():
        wd.write_run(path, config, dataset.image_shape, spe, len(dataset.train_images))
    state, progress = (
        (template, Progress()) if restored is None else (restored[0], Progress.from_meta(restored[1]))
    )
    if restored is not None:
        best = "-inf" if progress.best_val_acc is None else f"{progress.best_val_acc:.5f}"
        console.line(f"Resuming {path} from {progress.where(spe)} (best val_acc so far {best}).")
    if _is_primary():
        wd.rewrite_metrics(path, progress.history)
    if progress.epoch >= config.epochs:
        console.line(
            f"Run in {path} is finished ({progress.epoch} epochs); pass a larger "
            "--epochs to continue it, or --eval_only to evaluate it."
        )
        return state, list(progress.history)
    writer = report.EpochWriter(path, config.lr_epochs) if _is_primary() else None
    try:
        state, progress = _train(
            config, dataset, mesh, spe, state, progress, ckpts, console, stop, data_key, writer
        )
    finally:
        try:
            ckpts.wait()  # the outputs of the last saved epoch follow its checkpoint
        finally:
            if writer is not None:
                writer.close()
    last = progress.history[-1]
    console.test_result(last["val_loss"], last["val_acc"])
    return state, list(progress.history)


def _train(config, dataset, mesh, spe, state, progress, ckpts, console, stop, data_key, writer):
    """Epochs from `progress` to config.epochs; returns (state, progress)."""
    n = len(dataset.train_images)
    state = parallel.replicate(jax.device_get(state), mesh)
    data = pipeline.to_device(dataset, np.asarray(state.pixel_mean), config, mesh)
    chunk = pipeline.make_train_chunk(mesh, config.device_loop)
    evaluate = _compile(
        chunk, pipeline.make_evaluate(config, mesh), config, n, progress, state, data, data_key
    )
    for epoch in range(progress.epoch + 1, config.epochs + 1):
        lr = lr_for_epoch(config, epoch)
        console.epoch_start(epoch, config.epochs, lr)
        start = time.monotonic()
        key = pipeline.epoch_key(data_key, epoch - 1)
        perm = pipeline.permutation(key, n)
        sums = progress.partial
        for offset, step0, length, batch in pipeline.epoch_plan(
            n, config.batch_size, config.steps_per_call, progress.step_in_epoch
        ):
            state, m = chunk(state, data, perm, offset, step0, key, length=length, batch=batch)
            m = jax.device_get(m)
            ckpts.poll()  # the last epoch's outputs, once its checkpoint is on disk
            _check_finite(m, epoch, step0, spe, ckpts.path)
            sums = sums.add(m)
            done = step0 + length
            console.progress(done, spe, sums, start)
            if stop.is_set() and done < spe:
                ckpts.save(state, progress.stopped_mid_epoch(done, sums).to_meta(), rank=None)
                console.end_bar()
                raise Interrupted(
                    f"stopped at epoch {epoch}, step {done}/{spe}; state saved in "
                    f"{ckpts.path}. Run the same command to resume."
                )
        val = Sums().add(jax.device_get(evaluate(state, data)))
        rec = {
            "epoch": epoch,
            "lr": lr,
            "loss": sums.mean_loss,
            "acc": sums.accuracy,
            "val_loss": val.mean_loss,
            "val_acc": val.accuracy,
            "seconds": time.monotonic() - start,
        }
        best_before = progress.best_val_acc
        progress, improved = progress.epoch_done(rec)
        # metrics.jsonl, TensorBoard and curves.png follow the checkpoint: they are written once
        # it is on disk, so they never list an epoch that a restart would redo.
        ckpts.save(
            state,
            progress.to_meta(),
            rank=epoch if improved else -1,
            then=None if writer is None else functools.partial(writer.write, rec, progress.history),
        )
        console.epoch_end(spe, rec, best_before, improved, ckpts.path)
        if stop.is_set() and epoch < config.epochs:
            raise Interrupted(
                f"stopped after epoch {epoch}; state saved in {ckpts.path}. Run the same command to resume."
            )
    return state, progress


def _compile(chunk, evaluate, config, n, progress, state, data, data_key):
    """Compile every train-call shape the run will use and the evaluation, in parallel, up front
    (one compile per shape: the epoch's full calls, its shorter last call, the partial batch)."""
    key = pipeline.epoch_key(data_key, progress.epoch)
    perm = pipeline.permutation(key, n)
    shapes = {
        (length, batch)
        for _, _, length, batch in pipeline.epoch_plan(n, config.batch_size, config.steps_per_call)
        + pipeline.epoch_plan(n, config.batch_size, config.steps_per_call, progress.step_in_epoch)
    }
    (compiled_evaluate,) = chunk.compile(shapes, state, data, perm, key, extra=[evaluate.lower(state, data)])
    return compiled_evaluate


def _check_finite(m, epoch, step0, spe, where):
    bad = np.flatnonzero(~np.isfinite(m["loss"]))
    if bad.size:
        raise NonFinite(
            f"loss became {m['loss'][bad[0]] / m['count'][bad[0]]} at epoch {epoch}, "
            f"step {step0 + bad[0] + 1}/{spe}; stopped without saving it. The last good "
            f"checkpoint in {where} is intact: lower --learning_rate and rerun"
        )


def restore(workdir: str, which: str = "best") -> steps.TrainState:
    """The saved state of a run (`best` by val_acc, or `latest`), from the workdir alone."""
    if which not in ("best", "latest"):
        raise UserError(f"which must be 'best' or 'latest', got {which!r}")
    path = os.path.abspath(os.path.expanduser(workdir))
    saved = wd.read_run(path) if os.path.isdir(path) else None
    if saved is None:
        raise UserError(f"{path} holds no resnet_jax run (no {wd.RUN_FILE}); train one first")
    config, info = saved
    template = steps.abstract_train_state(config, info["image_shape"], info["steps_per_epoch"])
    if not os.path.isdir(os.path.join(path, checkpoint.FOLDER)):
        raise UserError(f"{path} has no checkpoint yet; train at least one epoch first")
    ckpts = checkpoint.Checkpoints(path, read_only=True)
    try:
        restored = ckpts.restore(template, which)
    finally:
        ckpts.close()
    if restored is None:
        raise UserError(f"{path} has no {which} checkpoint yet; train at least one epoch first")
    return restored[0]


def evaluate_checkpoint(
    workdir: str, which: str = "best", dataset: Dataset | None = None, data_dir: str | None = None
):
    """(test loss, test accuracy) of a saved state on the run's test set."""
    state = restore(workdir, which)
    config = state.config
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir)
    mesh = parallel.make_mesh()
    state = parallel.replicate(jax.device_get(state), mesh)
    data = pipeline.to_device(dataset, np.asarray(state.pixel_mean), config, mesh)
    val = Sums().add(jax.device_get(pipeline.make_evaluate(config, mesh)(state, data)))
    return val.mean_loss, val.accuracy
