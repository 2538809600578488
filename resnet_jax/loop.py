"""The whole run: train_and_evaluate (resumable), evaluate_checkpoint, restore."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Optional

import jax
import numpy as np

from resnet_jax import checkpoint, parallel, pipeline, report, workdir as wd
from resnet_jax.config import Config
from resnet_jax.data import Dataset, load_dataset, pixel_mean
from resnet_jax.errors import Interrupted, UserError
from resnet_jax.optim import lr_for_epoch
from resnet_jax.steps import TrainState, create_train_state


class NonFinite(UserError):
    """The loss became NaN or infinite."""


def fresh_meta() -> dict:
    return {"epoch": 0, "step_in_epoch": 0, "best_val_acc": None, "best_epoch": None,
            "history": [], "partial": {"loss": 0.0, "correct": 0.0, "count": 0.0}}


def keys(config: Config):
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    return init_key, data_key


def _is_primary() -> bool:
    return jax.process_index() == 0


def train_and_evaluate(config: Config, workdir: str, dataset: Optional[Dataset] = None, *,
                       verbosity: int = 1, stop: Optional[threading.Event] = None):
    """Train `config` in `workdir` (resuming what is there); returns (state, history).

    `dataset` may be an in-memory Dataset; otherwise config.dataset is loaded. `stop`, when set,
    ends the run after the current device call with the state saved (raises Interrupted).
    """
    path = wd.prepare(workdir)
    with wd.Lock(path, enabled=_is_primary()):  # one lock per run, held by process 0
        return _run(config, path, dataset, report.Console(verbosity if _is_primary() else 0),
                    stop or threading.Event())


def _setup(config: Config, path: str, dataset: Optional[Dataset]):
    """Everything checked before training starts: data, devices, workdir compatibility."""
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir)
    config = dataclasses.replace(config, num_classes=dataset.num_classes)
    n = len(dataset.train_images)
    if config.batch_size > n:
        raise UserError(f"batch_size {config.batch_size} is larger than the {n} training images; "
                        f"use --batch_size {n} or less")
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    saved = wd.read_run(path)
    if saved is not None:
        wd.check_compatible(saved[0], config, path)
    spe = pipeline.steps_per_epoch(n, config.batch_size)
    return config, dataset, mesh, spe


def _run(config, path, dataset, console, stop):
    config, dataset, mesh, spe = _setup(config, path, dataset)
    n = len(dataset.train_images)
    init_key, data_key = keys(config)
    template = create_train_state(config, init_key, dataset.image_shape, spe)
    template = template.replace(pixel_mean=jax.numpy.asarray(pixel_mean(dataset.train_images)))
    ckpts = checkpoint.Checkpoints(path)
    try:
        restored = ckpts.restore(template, "latest")
        if _is_primary():
            wd.write_run(path, config, dataset.image_shape, spe, n)
        state, meta = restored if restored else (template, fresh_meta())
        if restored:
            where = (f"epoch {meta['epoch']}" if not meta["step_in_epoch"] else
                     f"epoch {meta['epoch'] + 1}, step {meta['step_in_epoch']}/{spe}")
            console.line(f"Resuming {path} from {where} (best val_acc so far "
                         f"{_fmt_best(meta['best_val_acc'])}).")
        if _is_primary():
            wd.rewrite_metrics(path, meta["history"])
        if meta["epoch"] >= config.epochs:
            console.line(f"Run in {path} is finished ({meta['epoch']} epochs); pass a larger "
                         "--epochs to continue it, or --eval_only to evaluate it.")
            return state, meta["history"]
        return _train(config, path, dataset, mesh, spe, state, meta, ckpts, console, stop, data_key)
    finally:
        ckpts.close()


def _fmt_best(best):
    return "-inf" if best is None else f"{best:.5f}"


def _train(config, path, dataset, mesh, spe, state, meta, ckpts, console, stop, data_key):
    n = len(dataset.train_images)
    state = parallel.replicate(jax.device_get(state), mesh)
    data = pipeline.to_device(dataset, np.asarray(state.pixel_mean), config, mesh)
    train_chunk = pipeline.make_train_chunk(mesh, config.device_loop)
    evaluate = pipeline.make_evaluate(config, mesh)
    writer = report.EpochWriter(path, config.lr_epochs) if _is_primary() else None
    try:
        for epoch in range(meta["epoch"], config.epochs):
            lr = lr_for_epoch(config, epoch + 1)
            console.line(f"Epoch {epoch + 1}/{config.epochs}")
            console.line(f"Learning rate: {lr:g}")
            start = time.monotonic()
            key = pipeline.epoch_key(data_key, epoch)
            perm = pipeline.permutation(key, n)
            sums = dict(meta["partial"])
            for offset, step0, length, batch in pipeline.epoch_plan(
                    n, config.batch_size, config.steps_per_call, meta["step_in_epoch"]):
                state, m = train_chunk(state, data, perm, offset, step0, key, length=length, batch=batch)
                m = jax.device_get(m)
                ckpts.poll()  # the last epoch's outputs, once its checkpoint is on disk
                bad = np.flatnonzero(~np.isfinite(m["loss"]))
                if bad.size:
                    raise NonFinite(
                        f"loss became {m['loss'][bad[0]] / m['count'][bad[0]]} at epoch {epoch + 1}, "
                        f"step {step0 + bad[0] + 1}/{spe}; stopped without saving it. The last good "
                        f"checkpoint in {ckpts.path} is intact: lower --learning_rate and rerun")
                for k in sums:
                    sums[k] += float(np.sum(m[k], dtype=np.float64))
                done = step0 + length
                console.progress(done, spe, sums["loss"] / sums["count"],
                                 sums["correct"] / sums["count"], start)
                if stop.is_set() and done < spe:
                    meta = dict(meta, step_in_epoch=done, partial=sums)
                    ckpts.save(state, meta, rank=None)
                    console.end_bar()
                    raise Interrupted(f"stopped at epoch {epoch + 1}, step {done}/{spe}; state "
                                      f"saved in {ckpts.path}. Run the same command to resume.")
            console.end_bar()
            ev = jax.device_get(evaluate(state, data))
            rec = {"epoch": epoch + 1, "lr": lr, "loss": sums["loss"] / sums["count"],
                   "acc": sums["correct"] / sums["count"],
                   "val_loss": float(ev["loss"]) / float(ev["count"]),
                   "val_acc": float(ev["correct"]) / float(ev["count"]),
                   "seconds": time.monotonic() - start}
            best = meta["best_val_acc"]
            improved = best is None or rec["val_acc"] > best
            meta = dict(meta, epoch=epoch + 1, step_in_epoch=0, partial=fresh_meta()["partial"],
                        history=meta["history"] + [rec])
            if improved:
                meta.update(best_val_acc=rec["val_acc"], best_epoch=epoch + 1)
            # metrics.jsonl, TensorBoard and curves.png follow the checkpoint: they are written
            # once it is on disk, so they never list an epoch that a restart would redo.
            ckpts.save(state, meta, rank=epoch + 1 if improved else -1,
                       then=None if writer is None else functools.partial(writer.write, rec, meta["history"]))
            console.line(report.epoch_line(spe, rec))
            console.line("")
            if improved:
                console.line(f"Epoch {epoch + 1:05d}: val_acc improved from {_fmt_best(best)} to "
                             f"{rec['val_acc']:.5f}, saving model to {ckpts.path}")
            else:
                console.line(f"Epoch {epoch + 1:05d}: val_acc did not improve from {_fmt_best(best)}")
            if stop.is_set() and epoch + 1 < config.epochs:
                raise Interrupted(f"stopped after epoch {epoch + 1}; state saved in {ckpts.path}. "
                                  "Run the same command to resume.")
        last = meta["history"][-1]
        console.line(f"Test loss: {last['val_loss']}")
        console.line(f"Test accuracy: {last['val_acc']}")
        return state, meta["history"]
    finally:
        try:
            ckpts.wait()
        finally:
            if writer is not None:
                writer.close()


def restore(workdir: str, which: str = "best") -> TrainState:
    """The saved state of a run (`best` by val_acc, or `latest`), from the workdir alone."""
    if which not in ("best", "latest"):
        raise UserError(f"which must be 'best' or 'latest', got {which!r}")
    path = os.path.abspath(os.path.expanduser(workdir))
    saved = wd.read_run(path) if os.path.isdir(path) else None
    if saved is None:
        raise UserError(f"{path} holds no resnet_jax run (no {wd.RUN_FILE}); train one first")
    config, info = saved
    template = create_train_state(config, keys(config)[0], info["image_shape"], info["steps_per_epoch"])
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


def evaluate_checkpoint(workdir: str, which: str = "best", dataset: Optional[Dataset] = None,
                        data_dir: Optional[str] = None):
    """(test loss, test accuracy) of a saved state on the run's test set."""
    state = restore(workdir, which)
    config = state.config
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir)
    mesh = parallel.make_mesh()
    state = parallel.replicate(jax.device_get(state), mesh)
    data = pipeline.to_device(dataset, np.asarray(state.pixel_mean), config, mesh)
    ev = jax.device_get(pipeline.make_evaluate(config, mesh)(state, data))
    return float(ev["loss"]) / float(ev["count"]), float(ev["correct"]) / float(ev["count"])
