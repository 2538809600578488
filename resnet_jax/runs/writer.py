"""Everything a run or a sweep writes into its workdir and prints, behind one gate: process 0
does it, the other processes of a multi-host run do nothing (as the Flax examples' metric
writers, which only log on process 0). Orbax's checkpoints are not here: every process writes
its part of those.

    Writer.console    the seed log's lines, a sweep's table (stdout; silent off process 0)
    claim()           the workdir made, locked (one run at a time), holding only resnet_jax's files
    run_json()        run.json (what ran, changes, the test result)
    holdout()         holdout.json (the held-out validation images)
    history()         metrics.jsonl rewritten to the checkpointed history
    start_epochs()    then epoch(): one epoch's metrics.jsonl line, TensorBoard, curves.png
    json(), figure()  a sweep's runs.json, summary.json and curves.png

What passes outside the gate, all on stderr through resnet_jax.errors.say (one line each, from
whichever process meets it, at any verbosity): warnings about the process's own machine and
files (a cache it cannot write or read, a damaged checkpoint it skips, TensorBoard on a full
disk, malloc set too late), the notice that a Ctrl-C or SIGTERM was seen, and the command line's
last line (an error, or where a stopped run was saved). The decoding of an image folder into
the cache is said on stdout by the data loader (resnet_jax.data.cache.DecodeProgress), which a
notebook calls without a run: `verbose=False` silences it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time

from resnet_jax.atomic import write_text
from resnet_jax.checkpoint import run_files
from resnet_jax.runs import plots
from resnet_jax.runs.console import Console


class Writer:
    def __init__(self, path: str, verbosity: int = 1, primary: bool | None = None):
        import jax

        self.path = path
        self.primary = jax.process_index() == 0 if primary is None else primary
        self.console = Console(verbosity if self.primary else 0)
        self._epochs = None

    @contextlib.contextmanager
    def claim(self, locked: bool = False):
        """The workdir for this run: created if needed (every process), then locked by process 0
        (unless the caller holds the lock: `locked`) and checked for files resnet_jax did not
        write. A start that fails leaving nothing but the lock takes the lock (and a workdir it
        created) away again."""
        existed = os.path.isdir(self.path)
        run_files.prepare(self.path)
        if not self.primary:
            yield
            return
        with contextlib.nullcontext() if locked else run_files.Lock(self.path):
            try:
                run_files.check_foreign(self.path)
                yield
            except BaseException:
                if os.listdir(self.path) == [run_files.LOCK_FILE] and not locked:
                    os.unlink(os.path.join(self.path, run_files.LOCK_FILE))
                    if not existed:
                        os.rmdir(self.path)
                raise

    def run_json(self, info: dict):
        if self.primary:
            run_files.write_run(self.path, info)

    def holdout(self, indices):
        if self.primary and indices is not None:
            run_files.write_holdout(self.path, indices)

    def history(self, history):
        if self.primary:
            run_files.rewrite_metrics(self.path, history)

    def start_epochs(self, lr_epochs=()):
        """Per-epoch outputs from here on (curves.png marks the rate drops at `lr_epochs`)."""
        if self.primary:
            self._epochs = EpochWriter(self.path, lr_epochs)

    def epoch(self, record: dict, history):
        if self._epochs is not None:
            self._epochs.write(record, history)

    def close(self):
        if self._epochs is not None:
            epochs, self._epochs = self._epochs, None
            epochs.close()

    def json(self, name: str, data: dict):
        """A JSON file of the workdir (a sweep's runs.json, summary.json), whole or not at all."""
        if self.primary:
            run_files.prepare(self.path)
            write_text(os.path.join(self.path, name), json.dumps(data, indent=1))

    def figure(self, name: str, draw):
        """A picture of the workdir: `draw()` returns the matplotlib Figure (drawn on process 0 only)."""
        if self.primary:
            plots.save(draw(), os.path.join(self.path, name))


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

    def write(self, record: dict):
        """One event per epoch; a write the disk refuses is one warning line and TensorBoard is
        off for the rest of the run (a convenience: the run goes on)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if self.writer is None:
            return
        values = [
            Summary.Value(tag=name, simple_value=float(record[name]))
            for name in ("loss", "acc", "val_loss", "val_acc", "lr", "seconds")
            if record.get(name) is not None
        ]
        try:
            self.writer.write_event(
                Event(wall_time=time.time(), step=int(record["epoch"]), summary=Summary(value=values))
            )
            self.writer.flush()
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e):
        from resnet_jax.errors import is_disk_full, warn

        if not is_disk_full(e):
            raise e
        warn(
            f"TensorBoard events cannot be written in {self.folder} (no space left on device); "
            "the run goes on without them"
        )
        self.writer = None

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self._give_up(e)


class EpochWriter:
    """The per-epoch outputs of a run, written once per epoch: a metrics.jsonl line, TensorBoard
    scalars, and curves.png redrawn on a background thread (about 0.1 s of matplotlib that the
    devices need not wait for; `close` waits for the last picture). Epochs shorter than
    `redraw_seconds` are drawn at most that often (the picture is never more than that behind,
    and `close` draws the last epoch): matplotlib holds Python's lock while it draws, which slows
    a run of sub-second epochs by about a tenth (docs/performance.md)."""

    def __init__(self, workdir: str, lr_epochs=(), redraw_seconds: float = 2.0):
        from concurrent.futures import ThreadPoolExecutor

        self.workdir, self.lr_epochs = workdir, tuple(lr_epochs)
        self.redraw_seconds, self.drawn_at, self.deferred = redraw_seconds, -float("inf"), None
        self.tensorboard = TensorBoard(workdir)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curves")
        # matplotlib takes seconds to import on a slow CPU: done now, while the run compiles, so
        # the first picture (and a stop request right after it) does not wait for it.
        self.pending = self.pool.submit(importlib.import_module, "matplotlib.figure")

    def write(self, record: dict, history):
        run_files.append_metrics(self.workdir, record)
        self.tensorboard.write(record)
        if self.pending is not None and self.pending.done() and not self.pending.cancelled():
            self.pending.result()  # the last picture's error (a full disk) surfaces here
        self.deferred = list(history)
        if time.monotonic() - self.drawn_at >= self.redraw_seconds:
            self._draw()

    def _draw(self):
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()  # superseded by this epoch's picture, unless already drawing
        history, self.deferred, self.drawn_at = self.deferred, None, time.monotonic()
        path = os.path.join(self.workdir, "curves.png")
        self.pending = self.pool.submit(plots.plot_curves, history, path, self.lr_epochs)

    def close(self):
        if self.deferred is not None:
            self._draw()
        self.pool.shutdown(wait=True)
        if self.pending is not None and not self.pending.cancelled():
            self.pending.result()  # a drawing error surfaces here, not silently
        self.tensorboard.close()
