"""What a run shows: Keras-style console lines, TensorBoard events and curves.png."""

from __future__ import annotations

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

    def epoch_start(self, epoch: int, epochs: int, lr: float):
        self.line(f"Epoch {epoch}/{epochs}")
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
    """Per-epoch scalars as TensorBoard events under workdir/tensorboard.

    Written with the `tensorboard` package's own event writer and protos (no TensorFlow), so
    `tensorboard --logdir <workdir>` reads them after the README's install.
    """

    def __init__(self, workdir: str):
        import sys
        import types

        # tensorboard's writer uses TensorFlow's file API when TensorFlow is installed (importing
        # it costs seconds); this marker module makes it use its own, as without TensorFlow.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, rec: dict):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=name, simple_value=float(rec[name]))
            for name in ("loss", "acc", "val_loss", "val_acc", "lr", "seconds")
        ]
        self.writer.add_event(
            Event(wall_time=time.time(), step=int(rec["epoch"]), summary=Summary(value=values))
        )
        self.writer.flush()

    def close(self):
        self.writer.close()


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
        axes[1].set_title(f"accuracy (last val_acc {history[-1]['val_acc']:.4f}, lr {history[-1]['lr']:g})")
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), ".tmp-curves.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


class EpochWriter:
    """The per-epoch outputs of a run, written once per epoch: a metrics.jsonl line, TensorBoard
    scalars, and curves.png redrawn on a background thread (about 0.1 s of matplotlib that the
    devices need not wait for; `close` waits for the last picture)."""

    def __init__(self, workdir: str, lr_epochs=()):
        from concurrent.futures import ThreadPoolExecutor

        self.workdir, self.lr_epochs = workdir, tuple(lr_epochs)
        self.tensorboard = TensorBoard(workdir)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curves")
        self.pending = None

    def write(self, rec: dict, history):
        from resnet_jax import workdir as wd

        wd.append_metrics(self.workdir, rec)
        self.tensorboard.write(rec)
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
