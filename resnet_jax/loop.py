"""The whole run: train_and_evaluate (resumable), evaluate_checkpoint, restore."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time

import jax
import numpy as np

from resnet_jax import checkpoint, models, parallel, pipeline, report, steps, tuning
from resnet_jax import workdir as wd
from resnet_jax.config import Config
from resnet_jax.data import Dataset, load_dataset, pixel_mean, split_holdout
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
    summary: bool = False,
):
    """Train `config` in `workdir` (resuming what is there); returns (state, history).

    `dataset` may be an in-memory Dataset; otherwise config.dataset is loaded. `stop`, when set,
    ends the run after the current device call with the state saved (raises Interrupted).
    `summary` prints a per-layer table of the model before training.
    """
    path = wd.prepare(workdir)
    console = report.Console(verbosity if _is_primary() else 0)
    with wd.Lock(path, enabled=_is_primary()):  # one lock per run, held by process 0
        if _is_primary():  # the others could see process 0's fresh checkpoints/ before its run.json
            wd.check_foreign(path)
        if dataset is None:
            dataset = load_dataset(config.dataset, config.data_dir)
        config = dataclasses.replace(config, num_classes=dataset.num_classes)
        if (hint := tuning.advice(config)) is not None:
            console.line(hint)
        return _run(config, path, dataset, console, stop or threading.Event(), summary)


def _split(config: Config, dataset: Dataset):
    """(the data to train and validate on, the held-out indices or None): with val_split the
    validation set is held out of the training images and the test set waits for the end."""
    if not config.val_split:
        return dataset, None
    return split_holdout(dataset, config.val_split, config.seed)


def _check(config: Config, path: str, dataset: Dataset, data: dict, has_checkpoint: bool):
    """What is checked before training starts: batch size, devices, and (when the workdir holds
    a checkpoint) that model, data and seed are the run's. Returns (mesh, steps per epoch, the
    settings that changed, the changes recorded so far)."""
    n = len(dataset.train_images)
    if config.batch_size > n:
        raise UserError(
            f"batch_size {config.batch_size} is larger than the {n} training images; "
            f"use --batch_size {n} or less"
        )
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    saved = wd.read_run(path)
    changed, history = {}, []
    if saved is not None and has_checkpoint:
        wd.check_compatible(saved[0], config, path)
        wd.check_data(saved[1], data, path)
        changed, history = wd.changed_settings(saved[0], config), saved[1].get("changes") or []
    return mesh, pipeline.steps_per_epoch(n, config.batch_size), changed, history


def _run(config, path, full, console, stop, summary):
    data = full.describe()
    dataset, held = _split(config, full)
    if held is not None:
        data.update(val_split=config.val_split, held_out=len(held))
    has_checkpoint = checkpoint.exists(path)
    mesh, spe, changed, changes = _check(config, path, dataset, data, has_checkpoint)
    if held is not None:
        wd.check_holdout(path, held)
    ckpts = checkpoint.Checkpoints(path)
    try:
        init_key, data_key = keys(config)
        restored = None
        if has_checkpoint:  # restore into shapes alone: no initialisation is computed
            template = steps.abstract_train_state(config, dataset.image_shape, spe)
            restored = ckpts.restore(template, "latest", set_aside_damaged=_is_primary())
        if restored is None:
            state = steps.create_train_state(config, init_key, dataset.image_shape, spe)
            state, progress = (
                state.replace(pixel_mean=jax.numpy.asarray(pixel_mean(dataset.train_images))),
                Progress(),
            )
        else:
            state, progress = restored[0], Progress.from_meta(restored[1])
        if changed:
            changes = changes + [
                {"epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch, "settings": changed}
            ]
        if _is_primary():
            wd.write_run(path, config, dataset.image_shape, spe, len(dataset.train_images), data, changes)
            wd.rewrite_metrics(path, progress.history)
            if held is not None:
                wd.write_holdout(path, held)
        report_start(console, config, state, data, mesh, spe, path, summary)
        if restored is not None:
            best = "-inf" if progress.best_val_acc is None else f"{progress.best_val_acc:.5f}"
            console.line(f"Resuming {path} from {progress.where(spe)} (best val_acc so far {best}).")
        if changed:
            what = ", ".join(f"{k} {_fmt(old)} -> {_fmt(new)}" for k, (old, new) in changed.items())
            console.line(
                f"Settings changed from {progress.where(spe, next_step=True)} on: {what} "
                f"(recorded in {os.path.join(path, wd.RUN_FILE)})"
            )
        if progress.epoch >= config.epochs:
            console.line(
                f"Run in {path} is finished ({progress.epoch} epochs); pass a larger "
                "--epochs to continue it, or --eval_only to evaluate it."
            )
            return state, list(progress.history)
        writer = report.EpochWriter(path, config.lr_epochs) if _is_primary() else None
        try:
            val_on = "held-out" if held is not None else "test"
            state, progress = _train(
                config, dataset, mesh, spe, state, progress, ckpts, console, stop, data_key, writer, val_on
            )
        finally:
            try:
                ckpts.wait()  # the outputs of the last saved epoch follow its checkpoint
            finally:
                if writer is not None:
                    writer.close()
    finally:
        ckpts.close()
    if held is None:  # the seed's way: the last validation was on the test set
        last = progress.history[-1]
        console.test_result(last["val_loss"], last["val_acc"])
    else:  # the test set, touched once, by the final model
        test = _evaluate_on(state, full, config, mesh)
        console.test_result(test.mean_loss, test.accuracy)
    return state, list(progress.history)


def _evaluate_on(state, dataset: Dataset, config, mesh) -> Sums:
    """Summed metrics of a state on a dataset's test split."""
    state = parallel.replicate(jax.device_get(state), mesh)
    images, labels, weights = pipeline.eval_set(dataset.test_images, dataset.test_labels, config, mesh)
    mean = parallel.replicate(np.asarray(state.pixel_mean), mesh)
    data = pipeline.DeviceData(images[:0], labels[:0], images, labels, weights, mean)
    return Sums().add(jax.device_get(pipeline.make_evaluate(config, mesh)(state, data)))


def _fmt(value):
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def report_start(console, config, state, data, mesh, spe, path, summary):
    """What will run, before anything compiles: data, model, devices, steps, workdir."""
    params = sum(x.size for x in jax.tree.leaves(state.params))
    stats = sum(x.size for x in jax.tree.leaves(state.batch_stats))
    shape = "x".join(str(d) for d in data["image_shape"])
    console.line(
        f"Data: {config.dataset if data['source'] != 'arrays' else 'in-memory arrays'} "
        f"({data['source']}): {data['train']:,} train / {data['test']:,} test images of "
        f"{shape}, {data['classes']} classes"
    )
    preset = f" (preset {config.preset})" if config.preset else ""
    console.line(
        f"Model: {models.name(config)}{preset}: {params:,} parameters + {stats:,} batch-norm statistics"
    )
    if config.val_split:
        console.line(
            f"Validation: {data['held_out']:,} training images held out (seeded, class-stratified; "
            f"{data['train'] - data['held_out']:,} left to train on); the test set is used once, at the end"
        )
    else:
        console.line("Validation: the test set (as in the seed run); --val_split holds out training images")
    if summary:
        console.line(
            state.model.tabulate(
                jax.random.key(0),
                np.zeros((1,) + tuple(data["image_shape"]), np.float32),
                train=False,
                console_kwargs={"width": 120},
            )
        )
    device = mesh.devices.flat[0]
    console.line(
        f"Devices: {mesh.size} x {device.device_kind} ({device.platform}), batch "
        f"{config.batch_size} ({config.batch_size // mesh.size} per device), {config.dtype}"
    )
    console.line(f"Steps per epoch: {spe:,}; workdir {path}")


class _Pace:
    """Steps per device call: the config's on the scan loop (calls aligned to it); on the python
    loop (one jitted call per step) as many as fit in about half a second, so the progress bar
    moves and a stop request is seen at least that often."""

    def __init__(self, loop: str, steps_per_call: int, seconds: float = 0.5):
        self.loop, self.cap, self.seconds = loop, steps_per_call, seconds
        self.k = steps_per_call if loop == "scan" else 1

    def update(self, length: int, elapsed: float):
        if self.loop == "python" and elapsed > 0:
            self.k = int(min(self.cap, max(1, round(self.seconds * length / elapsed))))


def _train(config, dataset, mesh, spe, state, progress, ckpts, console, stop, data_key, writer, val_on):
    """Epochs from `progress` to config.epochs; returns (state, progress)."""
    n = len(dataset.train_images)
    state = parallel.replicate(jax.device_get(state), mesh)
    data = pipeline.to_device(dataset, np.asarray(state.pixel_mean), config, mesh)
    chunk = pipeline.make_train_chunk(mesh, config.device_loop)
    evaluate = _compile(
        chunk, pipeline.make_evaluate(config, mesh), config, n, progress, state, data, data_key, console
    )
    pace = _Pace(chunk.loop, config.steps_per_call)
    for epoch in range(progress.epoch + 1, config.epochs + 1):
        lr = lr_for_epoch(config, epoch)
        console.epoch_start(epoch, config.epochs, lr)
        start = time.monotonic()
        key = pipeline.epoch_key(data_key, epoch - 1)
        perm = pipeline.permutation(key, n)
        sums, step, first = progress.partial, progress.step_in_epoch, progress.step_in_epoch
        while step < spe:
            offset, step0, length, batch = pipeline.next_call(n, config.batch_size, pace.k, step)
            t = time.monotonic()
            state, m = chunk(state, data, perm, offset, step0, key, length=length, batch=batch)
            m = jax.device_get(m)
            pace.update(length, time.monotonic() - t)
            ckpts.poll()  # the last epoch's outputs, once its checkpoint is on disk
            _check_finite(m, epoch, step0, spe, ckpts)
            sums, step = sums.add(m), step0 + length
            console.progress(step, spe, sums, start)
            if stop.is_set() and step < spe:
                ckpts.save(state, progress.stopped_mid_epoch(step, sums).to_meta(), rank=None)
                console.end_bar()
                raise Interrupted(
                    f"stopped at epoch {epoch}, step {step}/{spe}; state saved in "
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
            "val_on": val_on,
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
        console.epoch_end(spe, rec, best_before, improved, ckpts.path, steps_run=spe - first)
        if stop.is_set() and epoch < config.epochs:
            raise Interrupted(
                f"stopped after epoch {epoch}; state saved in {ckpts.path}. Run the same command to resume."
            )
    return state, progress


def _compile(chunk, evaluate, config, n, progress, state, data, data_key, console):
    """Compile every train-call shape the run will use and the evaluation, in parallel, up front
    (one compile per shape: the epoch's full calls, its shorter last call, the partial batch)."""
    start = time.monotonic()
    key = pipeline.epoch_key(data_key, progress.epoch)
    perm = pipeline.permutation(key, n)
    plans = pipeline.epoch_plan(n, config.batch_size, config.steps_per_call)
    plans += pipeline.epoch_plan(n, config.batch_size, config.steps_per_call, progress.step_in_epoch)
    shapes = {(length, batch) for _, _, length, batch in plans}
    console.line(
        f"Compiling the train step ({len({chunk.shape(*s) for s in shapes})} call shapes) "
        "and the evaluation..."
    )
    (compiled_evaluate,) = chunk.compile(shapes, state, data, perm, key, extra=[evaluate.lower(state, data)])
    console.line(f"Compiled in {time.monotonic() - start:.1f} s.")
    return compiled_evaluate


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


def _open_run(workdir: str):
    """(path, config, run.json info) of a saved run; clear errors when there is none."""
    path = os.path.abspath(os.path.expanduser(workdir))
    saved = wd.read_run(path) if os.path.isdir(path) else None
    if saved is None:
        raise UserError(f"{path} holds no resnet_jax run (no {wd.RUN_FILE}); train one first")
    if not os.path.isdir(os.path.join(path, checkpoint.FOLDER)):
        raise UserError(f"{path} has no checkpoint yet; train at least one epoch first")
    return path, saved[0], saved[1]


def restore_with_meta(workdir: str, which: str = "best"):
    """(state, progress, step) of a saved checkpoint (`best` by val_acc, or `latest`)."""
    return _restore(*_open_run(workdir), which)


def _restore(path, config, info, which):
    if which not in ("best", "latest"):
        raise UserError(f"which must be 'best' or 'latest', got {which!r}")
    template = steps.abstract_train_state(config, info["image_shape"], info["steps_per_epoch"])
    ckpts = checkpoint.Checkpoints(path, read_only=True)
    try:
        try:
            restored = ckpts.restore(template, which)
        except UserError as e:
            raise UserError(f"{e}{_readable_alternative(ckpts, which)}") from None
    finally:
        ckpts.close()
    if restored is None:
        raise UserError(f"{path} has no {which} checkpoint yet; train at least one epoch first")
    return restored[0], Progress.from_meta(restored[1]), restored[2]


def _readable_alternative(ckpts, which) -> str:
    """What else is readable when the chosen checkpoint is not, and the flag that picks it."""
    if which == "best":
        for step in ckpts.steps()[::-1]:
            meta = ckpts.read_meta(step)
            if meta is not None:
                where = Progress.from_meta(meta).where(None)
                return f"; the latest checkpoint ({where}, step {step}) is readable: pass --which latest"
    return ""


def restore(workdir: str, which: str = "best") -> steps.TrainState:
    """The saved state of a run (`best` by val_acc, or `latest`), from the workdir alone."""
    return restore_with_meta(workdir, which)[0]


def evaluate_checkpoint(
    workdir: str,
    which: str = "best",
    dataset: Dataset | None = None,
    data_dir: str | None = None,
    console=None,
):
    """(test loss, test accuracy) of a saved state on the run's test set (or `dataset`'s)."""
    path, config, info = _open_run(workdir)
    if dataset is None:
        trained_on = (info.get("data") or {}).get("source", "")
        if trained_on == "arrays":
            raise UserError(
                f"the run in {path} trained on in-memory arrays, which the command line cannot "
                "load; evaluate it in Python: resnet_jax.evaluate_checkpoint(workdir, "
                "dataset=resnet_jax.Dataset(...))"
            )
        dataset = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir)
    if tuple(dataset.image_shape) != tuple(info["image_shape"]):
        raise UserError(
            f"the run in {path} trained on images of shape {tuple(info['image_shape'])}, the data "
            f"given has {tuple(dataset.image_shape)}; evaluate it on data of the run's shape"
        )
    state, progress, step = _restore(path, config, info, which)
    if console is not None:
        console.line(
            f"Evaluating the {which} checkpoint of {path}: {progress.where(None)} "
            f"(step {step}{', mid-epoch' if progress.step_in_epoch else ''}), on the "
            f"{len(dataset.test_images):,} test images"
        )
    test = _evaluate_on(state, dataset, state.config, parallel.make_mesh())
    return test.mean_loss, test.accuracy
