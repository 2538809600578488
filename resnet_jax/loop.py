"""The whole run: train_and_evaluate (resumable), evaluate_checkpoint, restore.

`train_and_evaluate` reads top to bottom as the run's story, one function in named sections
(as big_vision's train.py): workdir, data, platform, parts, state, record, compile, epochs, test.
What it decides (the mesh, the model, optimizer and augmentation, the device loop) is decided
there, once, and passed down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import time

import jax
import numpy as np

from resnet_jax import cache, checkpoint, faults, parallel, parts, pipeline, report, steps, tuning
from resnet_jax import workdir as wd
from resnet_jax.config import Config
from resnet_jax.data import Dataset, load_dataset, pixel_mean, split_holdout
from resnet_jax.errors import Interrupted, UserError
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
    platform = tuning.started()  # first: on a CPU, malloc is set up before JAX starts (tuning.py)
    console = report.Console(verbosity if _is_primary() else 0)
    stop = stop or threading.Event()
    with checkpoint.resumable_on_full_disk(path), contextlib.ExitStack() as run:
        # -- Workdir: one run at a time (a lock held by process 0), only resnet_jax's own files.
        wd.prepare(path)
        run.enter_context(wd.Lock(path, enabled=_is_primary()))
        if _is_primary():  # the others could see process 0's fresh checkpoints/ before its run.json
            wd.check_foreign(path)

        # -- Data: the test set validates (the seed's way), or a held-out part of the training set.
        if dataset is None:
            dataset = load_dataset(config.dataset, config.data_dir)
        config = dataclasses.replace(config, num_classes=dataset.num_classes, dataset=dataset.name)
        train_set, held = dataset, None
        if config.val_split:
            train_set, held = split_holdout(dataset, config.val_split, config.seed)
        data = wd.describe_data(dataset, config, held)

        # -- Platform: its settings (decided above), the mesh over every device, the steps of an epoch.
        if (hint := tuning.advice(config)) is not None:
            console.line(hint)
        mesh = parallel.make_mesh()
        spe = _steps_per_epoch(config, train_set, mesh)

        # -- Parts: the model, the optimizer and the augmentation (yours, else the Config's).
        chosen = parts.resolve(
            config, train_set.image_shape, spe, platform, model=model, optimizer=optimizer, augment=augment
        )
        template = steps.abstract_state(chosen.model, chosen.tx, config, train_set.image_shape)
        tree = wd.state_tree(template)  # every array a checkpoint holds: path, shape, dtype
        run.enter_context(faults.out_of_memory_as(config, chosen.record["model"]["name"], mesh))

        # -- State: the workdir's latest checkpoint (same model, data and seed), else a new one.
        ckpts = run.enter_context(checkpoint.Checkpoints(path, save_thread=platform.save_thread))
        saved = wd.read_run(path) if checkpoint.exists(path) else None
        changed = wd.check_resume(saved, config, data, tree, path)
        if held is not None:
            wd.check_holdout(path, held)
        init_key, data_key = keys(config)
        restored = ckpts.restore(template, "latest", set_aside_damaged=_is_primary()) if saved else None
        if restored is None:
            with cache.compiling():
                state = steps.init_state(chosen.model, chosen.tx, config, init_key, train_set.image_shape)
            state = state.replace(pixel_mean=jax.numpy.asarray(pixel_mean(train_set.train_images)))
            progress = Progress()
        else:
            state, progress = restored[0], Progress.from_meta(restored[1])

        # -- Record and report: run.json, metrics.jsonl, what will run.
        info = wd.run_info(
            saved,
            config,
            train_set,
            spe,
            data=data,
            parts=chosen.record,
            tree=tree,
            change=progress.change_record(changed) if changed else None,
            finished=progress.finished(config.epochs),
        )
        if _is_primary():
            wd.write_run(path, info)
            wd.rewrite_metrics(path, progress.history)
            if held is not None:
                wd.write_holdout(path, held)
        for line in report.start_lines(config, data, chosen.record, mesh, spe, path):
            console.line(line)
        if summary:
            console.line(report.summary(chosen.model, data["image_shape"]))
        if restored is not None:
            console.line(
                f"Resuming {path} from {progress.where(spe)} (best val_acc so far {progress.best()})."
            )
        if changed:
            console.line(report.changes_line(changed, progress.where(spe, next_step=True), path))
        if progress.finished(config.epochs):
            console.line(report.finished_line(path, progress, info.get("test")))
            return state, list(progress.history)

        # -- Compile: the dataset on the devices, every train-call shape and the evaluation.
        faults.check_data_fits(pipeline.device_bytes(train_set, config, mesh), mesh)
        n = len(train_set.train_images)
        state = parallel.replicate(jax.device_get(state), mesh)
        device_data = pipeline.to_device(train_set, np.asarray(state.pixel_mean), config, mesh)
        chunk = pipeline.make_train_chunk(mesh, config.device_loop, chosen.augment)
        evaluate = _compile(
            chunk,
            pipeline.make_evaluate(config, mesh),
            config,
            progress,
            state,
            device_data,
            data_key,
            console,
        )

        # -- Epochs: device calls of many steps, an evaluation, the callbacks, a checkpoint.
        drops = () if chosen.record["optimizer"]["own"] else config.lr_epochs  # curves.png marks these
        writer = report.EpochWriter(path, drops) if _is_primary() else None
        if writer is not None:
            run.callback(writer.close)
        pace = _Pace(chunk.loop, config.steps_per_call)
        val_on = "held-out" if held is not None else "test"
        for epoch in range(progress.epoch + 1, config.epochs + 1):
            lr = chosen.rate(state, epoch)
            console.epoch_start(epoch, config.epochs, lr)
            start = time.monotonic()
            key = pipeline.epoch_key(data_key, epoch - 1)
            perm = pipeline.permutation(key, n)
            sums, step, first = progress.partial, progress.step_in_epoch, progress.step_in_epoch
            sent, inflight = step, []  # steps handed to the devices; calls whose metrics are unread
            while step < spe:
                # Keep pace.ahead calls queued behind the one being read, so the devices never
                # wait for the host between calls (reading metrics, a thread holding the GIL).
                while sent < spe and len(inflight) <= pace.ahead and not (stop.is_set() and inflight):
                    offset, step0, length, batch = pipeline.next_call(n, config.batch_size, pace.k, sent)
                    state, m = chunk(state, device_data, perm, offset, step0, key, length=length, batch=batch)
                    inflight.append((m, step0, length, time.monotonic()))
                    sent = step0 + length
                m, step0, length, t = inflight.pop(0)
                m = jax.device_get(m)
                pace.update(length, time.monotonic() - t)
                ckpts.poll()  # the last epoch's outputs, once its checkpoint is on disk
                _check_finite(m, epoch, step0, spe, ckpts)
                sums, step = sums.add(m), step0 + length
                console.progress(step, spe, sums, start)
                if stop.is_set() and not inflight and step < spe:
                    ckpts.save(state, progress.stopped_mid_epoch(step, sums).to_meta(), rank=None)
                    console.end_bar()
                    raise Interrupted(
                        f"stopped at epoch {epoch}, step {step}/{spe}; state saved in "
                        f"{ckpts.path}. Run the same command to resume."
                    )
            val = Sums().add(jax.device_get(evaluate(state, device_data)))
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
            stopping = _callbacks_stop(callbacks, epoch, rec, state)
            best_before = progress.best_val_acc
            progress, improved = progress.epoch_done(rec, stopped=stopping)
            # metrics.jsonl, TensorBoard and curves.png follow the checkpoint: written once it is
            # on disk, they never list an epoch that a restart would redo.
            ckpts.save(
                state,
                progress.to_meta(),
                rank=epoch if improved else -1,
                then=None if writer is None else functools.partial(writer.write, rec, progress.history),
            )
            console.epoch_end(spe, rec, best_before, improved, ckpts.path, steps_run=spe - first)
            if stopping:
                console.line(f"Stopped by a callback after epoch {epoch}; the run is finished.")
                break
            if stop.is_set() and epoch < config.epochs:
                raise Interrupted(
                    f"stopped after epoch {epoch}; state saved in {ckpts.path}. "
                    "Run the same command to resume."
                )
        ckpts.wait()  # the outputs of the last saved epoch follow its checkpoint

        # -- Test: the seed reports the final model on the test set (its last validation); with a
        # held-out split the test set is touched here, once.
        if held is None:
            last = progress.history[-1]
            test = Sums(loss=last["val_loss"], correct=last["val_acc"], count=1.0)
        else:
            test = _evaluate_on(state, dataset, config, mesh)
        console.test_result(test.mean_loss, test.accuracy)
        if _is_primary():
            wd.write_run(path, wd.finished(info, test, progress, int(jax.device_get(state.step))))
        return state, list(progress.history)


def _steps_per_epoch(config: Config, train_set: Dataset, mesh) -> int:
    n = len(train_set.train_images)
    if config.batch_size > n:
        raise UserError(
            f"batch_size {config.batch_size} is larger than the {n} training images; "
            f"use --batch_size {n} or less"
        )
    parallel.check_batch_size(config.batch_size, mesh)
    return pipeline.steps_per_epoch(n, config.batch_size)


def _evaluate_on(state, dataset: Dataset, config, mesh) -> Sums:
    """Summed metrics of a state on a dataset's test split."""
    state = parallel.replicate(jax.device_get(state), mesh)
    images, labels, weights = pipeline.eval_set(dataset.test_images, dataset.test_labels, config, mesh)
    mean = parallel.replicate(np.asarray(state.pixel_mean), mesh)
    data = pipeline.DeviceData(images[:0], labels[:0], images, labels, weights, mean)
    return Sums().add(jax.device_get(pipeline.make_evaluate(config, mesh)(state, data)))


class _Pace:
    """Steps per device call: the config's on the scan loop (calls aligned to it); on the python
    loop (one jitted call per step) as many as fit in about half a second, so the progress bar
    moves and a stop request is seen at least that often."""

    def __init__(self, loop: str, steps_per_call: int, seconds: float = 0.5):
        self.loop, self.cap, self.seconds = loop, steps_per_call, seconds
        self.k = steps_per_call if loop == "scan" else 1
        # calls queued behind the one being read: one on the scan loop (accelerators); none on the
        # python loop, whose call is already many asynchronous steps and whose pace is timed.
        self.ahead = 1 if loop == "scan" else 0

    def update(self, length: int, elapsed: float):
        if self.loop == "python" and elapsed > 0:
            self.k = int(min(self.cap, max(1, round(self.seconds * length / elapsed))))


def _callbacks_stop(callbacks, epoch: int, rec: dict, state) -> bool:
    """Call every callback; True when one returned True (process 0's decision, on every process)."""
    stopping = False
    for fn in callbacks:
        stopping = (fn(epoch, dict(rec), state) is True) or stopping
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stopping = bool(multihost_utils.broadcast_one_to_all(np.asarray(stopping)))
    return stopping


def _compile(chunk, evaluate, config, progress, state, data, data_key, console):
    """Compile every train-call shape the run will use and the evaluation, in parallel, up front
    (one compile per shape: the epoch's full calls, its shorter last call, the partial batch);
    from the persistent compilation cache when it holds them (resnet_jax.cache)."""
    start = time.monotonic()
    n = data.train_labels.shape[0]
    key = pipeline.epoch_key(data_key, progress.epoch)
    perm = pipeline.permutation(key, n)
    plans = pipeline.epoch_plan(n, config.batch_size, config.steps_per_call)
    plans += pipeline.epoch_plan(n, config.batch_size, config.steps_per_call, progress.step_in_epoch)
    shapes = {(length, batch) for _, _, length, batch in plans}
    console.line(
        f"Compiling the train step ({len({chunk.shape(*s) for s in shapes})} call shapes) "
        "and the evaluation..."
    )
    with cache.compiling():
        (compiled_evaluate,) = chunk.compile(
            shapes, state, data, perm, key, extra=[evaluate.lower(state, data)]
        )
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


# -- Reading a saved run ----------------------------------------------------------------------


def _open_run(workdir: str):
    """(path, config, run.json info) of a saved run; clear errors when there is none."""
    path = os.path.abspath(os.path.expanduser(workdir))
    saved = wd.read_run(path) if os.path.isdir(path) else None
    if saved is None:
        raise UserError(f"{path} holds no resnet_jax run (no {wd.RUN_FILE}); train one first")
    if not os.path.isdir(os.path.join(path, checkpoint.FOLDER)):
        raise UserError(f"{path} has no checkpoint yet; train at least one epoch first")
    return path, saved[0], saved[1]


def restore_with_meta(workdir: str, which: str = "best", *, model=None, optimizer=None):
    """(state, progress, step) of a saved checkpoint (`best` by val_acc, or `latest`).

    A run of your own model needs `model=`. A run of your own optimizer restores its state as
    saved (plain arrays, no `tx`) unless you pass the `optimizer=` again."""
    path, config, info = _open_run(workdir)
    if which not in ("best", "latest"):
        raise UserError(f"which must be 'best' or 'latest', got {which!r}")
    record = info.get("parts") or {}
    if record.get("model", {}).get("own") and model is None:
        name = record["model"].get("class", "your model")
        raise UserError(
            f"the run in {path} trained your own model ({name}); pass it: "
            f"resnet_jax.restore(workdir, model={name}(...))"
        )
    image_shape, spe = tuple(info["image_shape"]), info["steps_per_epoch"]
    chosen = parts.resolve(config, image_shape, spe, tuning.started(), model=model, optimizer=optimizer)
    template = steps.abstract_state(chosen.model, chosen.tx, config, image_shape)
    as_saved = record.get("optimizer", {}).get("own") and optimizer is None
    wd.check_tree(info, wd.state_tree(template), path, only=("params", "batch_stats") if as_saved else None)
    with checkpoint.Checkpoints(path, read_only=True) as ckpts:
        try:
            restored = ckpts.restore(None if as_saved else template, which)
        except UserError as e:
            raise UserError(f"{e}{_readable_alternative(ckpts, which)}") from None
    if restored is None:
        raise UserError(f"{path} has no {which} checkpoint yet; train at least one epoch first")
    state = restored[0]
    if as_saved:
        state = steps.TrainState(**state, apply_fn=chosen.model.apply, tx=None, config=config)
    return state, Progress.from_meta(restored[1]), restored[2]


def _readable_alternative(ckpts, which) -> str:
    """What else is readable when the chosen checkpoint is not, and the flag that picks it."""
    if which == "best":
        for step in ckpts.steps()[::-1]:
            meta = ckpts.read_meta(step)
            if meta is not None:
                where = Progress.from_meta(meta).where(None)
                return f"; the latest checkpoint ({where}, step {step}) is readable: pass --which latest"
    return ""


def restore(workdir: str, which: str = "best", *, model=None, optimizer=None) -> steps.TrainState:
    """The saved state of a run (`best` by val_acc, or `latest`), from the workdir alone; a run
    of your own model needs `model=` (and, to go on training it, your `optimizer=`)."""
    return restore_with_meta(workdir, which, model=model, optimizer=optimizer)[0]


def evaluate_checkpoint(
    workdir: str,
    which: str = "best",
    dataset: Dataset | None = None,
    data_dir: str | None = None,
    console=None,
    *,
    model=None,
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
        if data_dir is None and config.data_dir is None and trained_on.startswith("folder:"):
            data_dir = trained_on.split(":", 1)[1]
        dataset = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir)
    if tuple(dataset.image_shape) != tuple(info["image_shape"]):
        raise UserError(
            f"the run in {path} trained on images of shape {tuple(info['image_shape'])}, the data "
            f"given has {tuple(dataset.image_shape)}; evaluate it on data of the run's shape"
        )
    state, progress, step = restore_with_meta(path, which, model=model)
    if console is not None:
        console.line(
            f"Evaluating the {which} checkpoint of {path}: {progress.where(None)} "
            f"(step {step}{', mid-epoch' if progress.step_in_epoch else ''}), on the "
            f"{len(dataset.test_images):,} test images"
        )
    test = _evaluate_on(state, dataset, state.config, parallel.make_mesh())
    return test.mean_loss, test.accuracy
