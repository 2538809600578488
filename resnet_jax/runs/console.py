"""What a run and a sweep print: the seed log's lines (Keras's), their start and end, tables,
and the progress of a first decoding. Nothing here writes a file; off process 0 a Console is
silent (resnet_jax.writer's gate)."""

from __future__ import annotations

import os
import sys
import time

from resnet_jax.data.cache import bar


def plural(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs', '1,563 steps'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def table(header, rows) -> list[str]:
    """Lines of a plain-text table: every column as wide as its widest cell, the first column
    left-aligned and the others right-aligned, two spaces apart."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = lambda i, text: text.ljust(widths[i]) if i == 0 else text.rjust(widths[i])
    return ["  ".join(align(i, c) for i, c in enumerate(row)).rstrip() for row in cells]


def live_display(stream) -> str | None:
    """Where a line can be redrawn in place: "terminal" (a tty), "kernel" (a Jupyter kernel's
    output, which renders a carriage return as a redraw: Keras's bar does the same), else None."""
    if getattr(stream, "isatty", lambda: False)():
        return "terminal"
    if type(stream).__module__.startswith("ipykernel"):
        return "kernel"
    return None


class Console:
    """Prints the seed log's story. verbosity 0: nothing; 1: epoch lines; 2: plus the progress of
    an epoch (step, loss, accuracy, images/s, time left): a line redrawn in place on a terminal
    or in a Jupyter kernel at each device call (at most every `redraw` seconds in a kernel), and
    elsewhere (a piped log) a line every `log_every` seconds."""

    def __init__(self, verbosity: int = 1, stream=None, log_every: float = 30.0, redraw: float = 0.25):
        self.stream = stream or sys.stdout
        self.verbosity = verbosity
        self.live = live_display(self.stream) if verbosity >= 2 else None
        self.bar = self.live is not None  # a line drawn in place, to end before another line
        self.log_every, self.redraw = log_every, redraw
        self._width, self._last = 0, None

    def line(self, text: str, level: int = 1):
        if self.verbosity >= level:
            print(text, file=self.stream, flush=True)

    def epoch_start(self, epoch: int, epochs: int, lr: float | None):
        self._last = time.monotonic()
        self.line(f"Epoch {epoch}/{epochs}")
        if lr is not None:  # an optimizer that does not say its rate (see parts.py) shows none
            self.line(f"Learning rate: {lr:g}")

    def progress(self, done: int, total: int, sums, start: float, first: int = 0, batch_size: int = 0):
        """Steps `done` of `total` (`first` of them done before `start`, by a run resumed
        mid-epoch), the epoch's summed metrics so far, `batch_size` images a step."""
        if self.verbosity < 2:
            return
        now = time.monotonic()
        last = self._last if self._last is not None else start
        due = self.redraw if self.live == "kernel" else (self.log_every if self.live is None else 0.0)
        if now - last < due and done < total:
            return
        self._last = now
        elapsed = max(now - start, 1e-9)
        rate = (done - first) / elapsed  # steps a second, this process's
        eta = (total - done) / rate if rate > 0 else 0.0
        text = (
            f"{done}/{total} {bar(done, total)} - ETA: {_duration(eta)} - "
            f"{rate * batch_size:,.0f} img/s - loss: {sums.mean_loss:.4f} - acc: {sums.accuracy:.4f}"
        )
        if self.live == "terminal":
            print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)  # \x1b[K: clear the rest
        elif self.live == "kernel":  # no escape codes: the rest of a longer line is overwritten
            print(f"\r{text.ljust(self._width)}", end="", file=self.stream, flush=True)
            self._width = len(text)
        elif done < total:  # a log: a line now and then
            print(text, file=self.stream, flush=True)

    def end_bar(self):
        if self.live == "terminal":
            print("\r\x1b[K", end="", file=self.stream)
        elif self.live == "kernel" and self._width:
            print("\r" + " " * self._width + "\r", end="", file=self.stream)
        self._width = 0

    def epoch_end(
        self, steps: int, record: dict, best_before, improved: bool, where: str, steps_run: int | None = None
    ):
        self.end_bar()
        self.line(epoch_line(steps, record, steps_run))
        self.line("")
        before = "-inf" if best_before is None else f"{best_before:.5f}"
        if improved:
            self.line(
                f"Epoch {record['epoch']:05d}: val_acc improved from {before} to "
                f"{record['val_acc']:.5f}, saving model to {where}"
            )
        else:
            self.line(f"Epoch {record['epoch']:05d}: val_acc did not improve from {before}")

    def test_result(self, loss: float, acc: float):
        self.line(f"Test loss: {loss}")
        self.line(f"Test accuracy: {acc}")


def start_lines(config, data: dict, parts, mesh, steps_per_epoch: int, path: str) -> list[str]:
    """What will run, before anything compiles: data, model, optimizer, augmentation, validation,
    devices, steps, workdir."""
    record = parts.record
    shape = "x".join(str(d) for d in data["image_shape"])
    source = {"arrays": "in-memory arrays"}.get(data["source"].split(":")[0], config.dataset)
    lines = [
        f"Data: {source} ({data['source']}): {data['train']:,} train / {data['test']:,} test images of "
        f"{shape}, {data['classes']} classes"
    ]
    split = data.get("test_split")
    if split:  # a folder without a test split: one held out
        lines[0] += (
            f"; the test set held out of the folder's {split['of']:,} images ({split['held_out']:,}, "
            f"test_split {split['test_split']:g}, seeded, stratified)"
        )
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
        + _cpu_split(config, mesh, data["image_shape"], parts.model if model["own"] else None)
    )
    lines.append(f"Steps per epoch: {steps_per_epoch:,}; workdir {path}")
    return lines


def _cpu_split(config, mesh, image_shape, model) -> str:
    """Why a CPU runs as fewer JAX devices than it has cores (resnet_jax.tuning), or nothing."""
    import jax

    from resnet_jax import tuning
    from resnet_jax.device import parallel

    cores = tuning.cores()
    if mesh.devices.flat[0].platform != "cpu" or jax.process_count() > 1 or mesh.size >= cores:
        return ""
    flops = parallel.step_flops(config, image_shape, model)  # as the run's mesh traced it (once)
    small = flops is not None and flops < tuning.SPLIT_MIN_FLOPS
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


def resume_lines(path: str, progress, steps_per_epoch: int, changed: dict) -> list[str]:
    """What a resumed run says before it compiles: where it goes on from, and the settings that
    changed (in run.json's terms: after how many epochs, and steps of the next)."""
    stands = progress.where(steps_per_epoch)
    if progress.step_in_epoch:
        where = f"at {stands}"
        after = (
            f"after epoch {progress.epoch} and {progress.step_in_epoch}/{steps_per_epoch} steps of the next"
        )
    else:
        where = after = f"after {stands}"
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


def _duration(seconds: float) -> str:
    """12s, 3:07, 1:02:05."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}:{seconds:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def epoch_line(steps: int, record: dict, steps_run: int | None = None) -> str:
    """The seed log's epoch line; ms/step over the steps this process ran (a resumed epoch ran
    only the rest of them)."""
    ms = 1000 * record["seconds"] / max(steps if steps_run is None else steps_run, 1)
    return (
        f"{steps}/{steps} [==============================] - {record['seconds']:.0f}s {ms:.0f}ms/step"
        f" - loss: {record['loss']:.4f} - acc: {record['acc']:.4f} - val_loss: {record['val_loss']:.4f}"
        f" - val_acc: {record['val_acc']:.4f}"
    )
