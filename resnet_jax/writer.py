"""Everything a run writes into its workdir and prints, behind one gate: process 0 does it, the
other processes of a multi-host run do nothing (as the Flax examples' metric writers, which only
log on process 0). Orbax's checkpoints are not here: every process writes its part of those.

    claim()        the workdir made, locked (one run at a time), holding only resnet_jax's files
    run_json()     run.json (what ran, changes, the test result)
    holdout()      holdout.json (the held-out validation images)
    history()      metrics.jsonl rewritten to the checkpointed history
    epoch()        one epoch's outputs: a metrics.jsonl line, TensorBoard, curves.png
    console        the seed log's lines (silent off process 0)
"""

from __future__ import annotations

import contextlib
import os

from resnet_jax import report
from resnet_jax import workdir as wd


class RunWriter:
    def __init__(self, path: str, verbosity: int = 1, primary: bool | None = None):
        import jax

        self.path = path
        self.primary = jax.process_index() == 0 if primary is None else primary
        self.console = report.Console(verbosity if self.primary else 0)
        self._epochs = None

    @contextlib.contextmanager
    def claim(self):
        """The workdir for this run: created if needed (every process), then locked by process 0
        and checked for files resnet_jax did not write. A start that fails leaving nothing but
        the lock takes the lock (and a workdir it created) away again."""
        existed = os.path.isdir(self.path)
        wd.prepare(self.path)
        if not self.primary:
            yield
            return
        with wd.Lock(self.path):
            try:
                wd.check_foreign(self.path)
                yield
            except BaseException:
                if os.listdir(self.path) == [wd.LOCK_FILE]:
                    os.unlink(os.path.join(self.path, wd.LOCK_FILE))
                    if not existed:
                        os.rmdir(self.path)
                raise

    def run_json(self, info: dict):
        if self.primary:
            wd.write_run(self.path, info)

    def holdout(self, indices):
        if self.primary and indices is not None:
            wd.write_holdout(self.path, indices)

    def history(self, history):
        if self.primary:
            wd.rewrite_metrics(self.path, history)

    def start_epochs(self, lr_epochs=()):
        """Per-epoch outputs from here on (curves.png marks the rate drops at `lr_epochs`)."""
        if self.primary:
            self._epochs = report.EpochWriter(self.path, lr_epochs)

    def epoch(self, rec: dict, history):
        if self._epochs is not None:
            self._epochs.write(rec, history)

    def close(self):
        if self._epochs is not None:
            epochs, self._epochs = self._epochs, None
            epochs.close()
