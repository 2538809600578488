"""What a run shows: Keras-style console lines, TensorBoard events and curves.png."""

from __future__ import annotations

import importlib
import os
import sys
import time


class Console:
    """Prints the seed log's story. verbosity 0: nothing; 1: epoch lines; 2: plus a progress bar.

    The bar is drawn only on a terminal, updated once per device call.
    """

    def __init__(self, verbosity: int = 1, stream=None):
        self.stream = stream or sys.stdout
        self.verbosity = verbosity
        self.bar = verbosity >= 2 and getattr(self.stream, "isatty", lambda: False)()

    def line(self, text: str, level: int = 1):
        if self.verbosity >= level:
            print(text, file=self.stream, flush=True)

    def epoch_start(self, epoch: int, epochs: int, lr: float | None):
        self.line(f"Epoch {epoch}/{epochs}")
        if lr is not None:  # an optimizer that does not say its rate (see parts.py) shows none
            self.line(f"Learning rate: {lr:g}")

    def progress(self, done: int, total: int, sums, start: float):
        if not self.bar:
            return
        width = 30
        filled = int(width * done / total)
        arrow = "=" * max(filled - 1, 0) + (">" if done < total else "=") if filled else ""
        eta = (time.monotonic() - start) / max(done, 1) * (total - done)
        print(
            f"\r{done}/{total} [{arrow:<{width}}] - ETA: {eta:.0f}s - loss: {sums.mean_loss:.4f} - "
            f"acc: {sums.accuracy:.4f}\x1b[K",
            end="",
            file=self.stream,
            flush=True,
        )  # \x1b[K: clear the rest

    def end_bar(self):
        if self.bar:
            print("\r\x1b[K", end="", file=self.stream)

    def epoch_end(
        self, steps: int, rec: dict, best_before, improved: bool, where: str, steps_run: int | None = None
    ):
        self.end_bar()
        self.line(epoch_line(steps, rec, steps_run))
        self.line("")
        before = "-inf" if best_before is None else f"{best_before:.5f}"
        if improved:
            self.line(
                f"Epoch {rec['epoch']:05d}: val_acc improved from {before} to "
                f"{rec['val_acc']:.5f}, saving model to {where}"
            )
        else:
            self.line(f"Epoch {rec['epoch']:05d}: val_acc did not improve from {before}")

    def test_result(self, loss: float, acc: float):
        self.line(f"Test loss: {loss}")
        self.line(f"Test accuracy: {acc}")


def start_lines(config, data: dict, record: dict, mesh, spe: int, path: str) -> list[str]:
    """What will run, before anything compiles: data, model, optimizer, augmentation, validation,
    devices, steps, workdir."""
    shape = "x".join(str(d) for d in data["image_shape"])
    source = {"arrays": "in-memory arrays"}.get(data["source"].split(":")[0], config.dataset)
    lines = [
        f"Data: {source} ({data['source']}): {data['train']:,} train / {data['test']:,} test images of "
        f"{shape}, {data['classes']} classes"
    ]
    model, optimizer, augment = record["model"], record["optimizer"], record["augment"]
    preset = f" (preset {config.preset})" if config.preset and not model["own"] else ""
    stats = (
        f" + {model['batch_stats']:,} batch-norm statistics" if model["batch_stats"] else ", no batch norm"
    )
    lines.append(f"Model: {model['name']}{preset}: {model['parameters']:,} parameters{stats}")
    if optimizer["own"]:
        shown = (
            "" if optimizer["learning_rate"] == "inject_hyperparams" else "; its learning rate is not shown"
        )
        lines.append(f"Optimizer: yours, {optimizer['name']}{shown}; L2 {config.l2_weight:g} on kernels")
    if augment["own"]:
        lines.append(f"Augmentation: yours, {augment['name']}")
    if config.val_split:
        lines.append(
            f"Validation: {data['held_out']:,} training images held out (seeded, class-stratified; "
            f"{data['train'] - data['held_out']:,} left to train on); the test set is used once, at the end"
        )
    else:
        lines.append("Validation: the test set (as in the seed run); --val_split holds out training images")
    device = mesh.devices.flat[0]
    lines.append(
        f"Devices: {mesh.size} x {device.device_kind} ({device.platform}), batch "
        f"{config.batch_size} ({config.batch_size // mesh.size} per device), {config.dtype}"
        + _cpu_split(config, mesh, data["image_shape"], model["own"])
    )
    lines.append(f"Steps per epoch: {spe:,}; workdir {path}")
    return lines


def _cpu_split(config, mesh, image_shape, own_model: bool) -> str:
    """Why a CPU runs as fewer JAX devices than it has cores (resnet_jax.tuning), or nothing."""
    import jax

    from resnet_jax import models, tuning

    cores = tuning.cores()
    if mesh.devices.flat[0].platform != "cpu" or jax.process_count() > 1 or mesh.size >= cores:
        return ""
    small = (
        not own_model
        and config.batch_size * models.forward_flops(config, image_shape) < tuning.SPLIT_MIN_FLOPS
    )
    why = "the model is small: one device runs it faster" if small else "as JAX was started"
    return f"; {mesh.size} of {cores} cores as devices ({why}; --cpu_devices N to choose)"


def summary(model, image_shape) -> str:
    """A per-layer table of the model (as Keras's model.summary())."""
    import jax
    import numpy as np

    return model.tabulate(
        jax.random.key(0),
        np.zeros((1,) + tuple(image_shape), np.float32),
        train=False,
        console_kwargs={"width": 120},
    )


def _fmt(value):
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def resume_lines(path: str, progress, spe: int, changed: dict) -> list[str]:
    """What a resumed run says before it compiles: where it goes on from, and the settings that
    changed (in run.json's terms: after how many epochs, and steps of the next)."""
    if progress.step_in_epoch:
        where = f"at epoch {progress.epoch + 1}, step {progress.step_in_epoch}/{spe}"
        after = f"after epoch {progress.epoch} and {progress.step_in_epoch}/{spe} steps of the next"
    else:
        where = after = f"after epoch {progress.epoch}"
    best = (
        "no epoch finished yet" if progress.best_val_acc is None else f"best val_acc so far {progress.best()}"
    )
    lines = [f"Resuming {path} {where} ({best})."]
    if changed:
        what = ", ".join(f"{k} {_fmt(old)} -> {_fmt(new)}" for k, (old, new) in changed.items())
        lines.append(f"Settings changed {after}: {what} (recorded in {os.path.join(path, 'run.json')})")
    return lines


def finished_line(path: str, progress, test: dict | None) -> str:
    if progress.stopped:
        text = f"Run in {path} is finished (stopped by a callback after epoch {progress.epoch})"
    else:
        text = (
            f"Run in {path} is finished ({progress.epoch} epochs); pass a larger --epochs to continue it,"
            " or --eval_only to evaluate it"
        )
    if test:
        text += (
            f". Test loss {test['loss']:.4f}, Test accuracy {test['accuracy']:.4f} (epoch {test['epoch']})"
        )
    return text + "."


def epoch_line(steps: int, rec: dict, steps_run: int | None = None) -> str:
    """The seed log's epoch line; ms/step over the steps this process ran (a resumed epoch ran
    only the rest of them)."""
    ms = 1000 * rec["seconds"] / max(steps if steps_run is None else steps_run, 1)
    return (
        f"{steps}/{steps} [==============================] - {rec['seconds']:.0f}s {ms:.0f}ms/step"
        f" - loss: {rec['loss']:.4f} - acc: {rec['acc']:.4f} - val_loss: {rec['val_loss']:.4f}"
        f" - val_acc: {rec['val_acc']:.4f}"
    )


class TensorBoard:
    """Per-epoch scalars as TensorBoard events under workdir/tensorboard, written with
    tensorboardX's event-file writer (pure Python, no TensorFlow), synchronously: an event is on
    disk when `write` returns, and a full disk is seen here, not on a writer thread. `tensorboard
    --logdir <workdir>` reads them."""

    def __init__(self, workdir: str):
        self.folder, self.writer = os.path.join(workdir, "tensorboard"), None
        try:
            from tensorboardX.event_file_writer import EventsWriter

            os.makedirs(self.folder, exist_ok=True)
            self.writer = EventsWriter(os.path.join(self.folder, "events"))
        except OSError as e:  # a full disk at the first event file
            self._give_up(e)

    def write(self, rec: dict):
        """One event per epoch; a write the disk refuses is one warning line and TensorBoard is
        off for the rest of the run (a convenience: the run goes on)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if self.writer is None:
            return
        values = [
            Summary.Value(tag=name, simple_value=float(rec[name]))
            for name in ("loss", "acc", "val_loss", "val_acc", "lr", "seconds")
            if rec.get(name) is not None
        ]
        try:
            self.writer.write_event(
                Event(wall_time=time.time(), step=int(rec["epoch"]), summary=Summary(value=values))
            )
            self.writer.flush()
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e):
        from resnet_jax.faults import is_disk_full

        if not is_disk_full(e):
            raise e
        print(
            f"warning: TensorBoard events cannot be written in {self.folder} (no space left on device); "
            "the run goes on without them",
            file=sys.stderr,
            flush=True,
        )
        self.writer = None

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self._give_up(e)


def plot_curves(history, path: str, lr_epochs=()):
    """Loss and accuracy, train vs val, by epoch; dotted lines where the rate changes.

    Uses matplotlib's object API (no pyplot, no global figure state), so it can run on the
    `EpochWriter`'s background thread."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "loss", "loss (with L2)"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [r[key] for r in history], "o-", ms=3, label=f"train {key}")
        ax.plot(
            epochs,
            [r["val_" + key] for r in history],
            "o-",
            ms=3,
            label=f"val {key} ({history[-1].get('val_on', 'test')} set)",
        )
        for i, boundary in enumerate(e for e in lr_epochs if epochs and e < epochs[-1]):
            ax.axvline(
                boundary + 0.5, color="gray", ls=":", lw=1, label="learning rate drops" if i == 0 else None
            )
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    if history:
        lr = history[-1].get("lr")
        rate = "" if lr is None else f", lr {lr:g}"
        axes[1].set_title(f"accuracy (last val_acc {history[-1]['val_acc']:.4f}{rate})")
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), ".tmp-curves.png")
    from resnet_jax.faults import writing

    try:
        with writing("curves.png", path):
            fig.savefig(tmp, dpi=90)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class EpochWriter:
    """The per-epoch outputs of a run, written once per epoch: a metrics.jsonl line, TensorBoard
    scalars, and curves.png redrawn on a background thread (about 0.1 s of matplotlib that the
    devices need not wait for; `close` waits for the last picture)."""

    def __init__(self, workdir: str, lr_epochs=()):
        from concurrent.futures import ThreadPoolExecutor

        self.workdir, self.lr_epochs = workdir, tuple(lr_epochs)
        self.tensorboard = TensorBoard(workdir)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curves")
        # matplotlib takes seconds to import on a slow CPU: done now, while the run compiles, so
        # the first picture (and a stop request right after it) does not wait for it.
        self.pending = self.pool.submit(importlib.import_module, "matplotlib.figure")

    def write(self, rec: dict, history):
        from resnet_jax import workdir as wd

        wd.append_metrics(self.workdir, rec)
        self.tensorboard.write(rec)
        if self.pending is not None and self.pending.done() and not self.pending.cancelled():
            self.pending.result()  # the last picture's error (a full disk) surfaces here
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()  # superseded by this epoch's picture, unless already drawing
        self.pending = self.pool.submit(
            plot_curves, list(history), os.path.join(self.workdir, "curves.png"), self.lr_epochs
        )

    def close(self):
        self.pool.shutdown(wait=True)
        if self.pending is not None and not self.pending.cancelled():
            self.pending.result()  # a drawing error surfaces here, not silently
        self.tensorboard.close()
