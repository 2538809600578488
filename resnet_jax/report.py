"""What a run shows: Keras-style console lines, TensorBoard events and curves.png."""

from __future__ import annotations

import importlib
import os
import sys
import time


def plural(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs', '1,563 steps'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def bar(done: int, total: int, width: int = 30) -> str:
    """Keras's progress bar: [=====>........]."""
    filled = int(width * done / max(total, 1))
    arrow = "=" * max(filled - 1, 0) + (">" if done < total else "=") if filled else ""
    return f"[{arrow:<{width}}]"


def table(header, rows) -> list[str]:
    """Lines of a plain-text table: every column as wide as its widest cell, the first column
    left-aligned and the others right-aligned, two spaces apart."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = lambda i, text: text.ljust(widths[i]) if i == 0 else text.rjust(widths[i])
    return ["  ".join(align(i, c) for i, c in enumerate(row)).rstrip() for row in cells]


def curves_figure(groups, title: str):
    """val_acc by epoch of groups of runs [(label, [history, ...]), ...]: each group's mean with
    markers and a ± sd band (two runs or more); with one group, each run too (thin). Epochs are
    whole numbers on the axis."""
    import statistics

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for k, (label, histories) in enumerate(groups):
        color = f"C{k % 10}"
        if len(groups) == 1:
            for history in histories:
                ax.plot(
                    [r["epoch"] for r in history], [r["val_acc"] for r in history], ".-", lw=0.8, alpha=0.5
                )
        length = min(len(h) for h in histories)
        epochs = list(range(1, length + 1))
        values = [[h[i]["val_acc"] for h in histories] for i in range(length)]
        mean = [statistics.fmean(v) for v in values]
        n = len(histories)
        ax.plot(
            epochs, mean, "o-", color="k" if len(groups) == 1 else color, lw=2, ms=5, label=f"{label} (n={n})"
        )
        if n > 1:
            sd = [statistics.stdev(v) for v in values]
            lo, hi = [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
            ax.fill_between(epochs, lo, hi, color="k" if len(groups) == 1 else color, alpha=0.15, lw=0)
    longest = max(len(h) for _, histories in groups for h in histories)
    ax.set_xlim(0.5, longest + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_acc (mean ± sd)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


class DecodeProgress:
    """What a first run shows while an image folder is decoded into the cache: one line, with a
    progress bar on a terminal, then the time it took (later runs read the cache)."""

    def __init__(self, source: str, stream=None):
        self.source, self.stream = source, stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.began = None

    def __call__(self, done: int, total: int | None):
        head = f"Decoding the images of {self.source} into the cache, once"
        if self.began is None:
            self.began = time.monotonic()
            end = "" if self.tty else "\n"
            print(head + ("" if self.tty else "..."), end=end, file=self.stream, flush=True)
        if total is None:  # before the files are read
            return
        if self.tty:
            line = f"\r{head} {bar(done, total)} {done:,}/{total:,}\x1b[K"
            print(line, end="", file=self.stream, flush=True)
        if done == total:
            seconds = time.monotonic() - self.began
            note = f"Decoded {total:,} images in {seconds:.1f} s; later runs read them from the cache"
            print(("\n" if self.tty else "") + note, file=self.stream, flush=True)


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
        eta = (time.monotonic() - start) / max(done, 1) * (total - done)
        print(
            f"\r{done}/{total} {bar(done, total)} - ETA: {eta:.0f}s - loss: {sums.mean_loss:.4f} - "
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
            f"Run in {path} is finished ({plural(progress.epoch, 'epoch')}); pass a larger --epochs to "
            "continue it, or --eval_only to evaluate it"
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
