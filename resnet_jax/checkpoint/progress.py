"""Where a run stands, as data: `Progress` (epochs done, step in the current epoch, best so far,
history, the running sums of a half-done epoch). A checkpoint's JSON `meta` is
`Progress.to_meta()`."""

from __future__ import annotations

import dataclasses

from resnet_jax.device.metrics import Sums


@dataclasses.dataclass(frozen=True)
class Progress:
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in epoch `epoch + 1` (a mid-epoch stop), else 0
    best_val_acc: float | None = None
    best_epoch: int | None = None
    history: tuple = ()  # one record per completed epoch (metrics.jsonl's lines)
    partial: Sums = Sums()  # running sums of the half-done epoch
    stopped: bool = False  # a callback ended the run after `epoch`: it is finished
    partial_seconds: float = 0.0  # seconds spent on the half-done epoch before it stopped

    def to_meta(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "history": list(self.history),
            "partial": dataclasses.asdict(self.partial),
            "stopped": self.stopped,
            "partial_seconds": self.partial_seconds,
        }

    @classmethod
    def from_meta(cls, meta: dict) -> Progress:
        return cls(
            meta["epoch"],
            meta["step_in_epoch"],
            meta["best_val_acc"],
            meta["best_epoch"],
            tuple(meta["history"]),
            Sums(**meta["partial"]),
            bool(meta.get("stopped", False)),
            float(meta.get("partial_seconds", 0.0)),
        )

    def stopped_mid_epoch(self, step: int, sums: Sums, seconds: float) -> Progress:
        """Stopped at `step` of the next epoch, `seconds` after this process resumed it."""
        return dataclasses.replace(
            self, step_in_epoch=step, partial=sums, partial_seconds=self.partial_seconds + seconds
        )

    def epoch_done(self, rec: dict, stopped: bool = False) -> tuple[Progress, bool]:
        """The progress after an epoch with record `rec` (`stopped`: by a callback, the run's
        last); whether val_acc strictly improved."""
        improved = self.best_val_acc is None or rec["val_acc"] > self.best_val_acc
        best = (rec["val_acc"], rec["epoch"]) if improved else (self.best_val_acc, self.best_epoch)
        return Progress(rec["epoch"], 0, *best, self.history + (rec,), Sums(), stopped), improved

    def finished(self, epochs: int) -> bool:
        """Whether nothing is left to train: every epoch done, or a callback stopped the run."""
        return self.stopped or self.epoch >= epochs

    def best(self) -> str:
        return "-inf" if self.best_val_acc is None else f"{self.best_val_acc:.5f}"

    def change_record(self, settings: dict) -> dict:
        """run.json's entry for settings changed on a resume from here."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "settings": settings}

    def where(self, steps_per_epoch: int | None = None) -> str:
        """Where the run stands: 'epoch E' (E completed), or 'epoch E+1, step S/N' mid-epoch."""
        if not self.step_in_epoch:
            return f"epoch {self.epoch}"
        total = f"/{steps_per_epoch}" if steps_per_epoch else ""
        return f"epoch {self.epoch + 1}, step {self.step_in_epoch}{total}"
