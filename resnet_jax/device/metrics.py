"""A run's metrics as data: `Sums` (summed over steps or batches, so any batching adds up
exactly), an epoch's record (metrics.jsonl's line), and the NaN guard on a device call's steps."""

from __future__ import annotations

import dataclasses

import numpy as np

from resnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sums:
    """Summed metrics (see steps.summed_metrics): means are sum / count, exact over any batching."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def add(self, metrics) -> Sums:
        """These sums plus per-step (or scalar) metric arrays, added in float64."""
        return Sums(
            *(
                getattr(self, k) + float(np.sum(metrics[k], dtype=np.float64))
                for k in ("loss", "correct", "count")
            )
        )

    @property
    def mean_loss(self) -> float:
        return self.loss / self.count

    @property
    def accuracy(self) -> float:
        return self.correct / self.count


def epoch_record(epoch, lr, sums: Sums, val: Sums, val_on: str, seconds: float) -> dict:
    """metrics.jsonl's line for an epoch."""
    return {
        "epoch": epoch,
        "lr": lr,
        "loss": sums.mean_loss,
        "acc": sums.accuracy,
        "val_loss": val.mean_loss,
        "val_acc": val.accuracy,
        "val_on": val_on,
        "seconds": seconds,
    }


class NonFinite(UserError):
    """The loss became NaN or infinite."""


def check_finite(metrics, epoch: int, first_step: int, steps_per_epoch: int, ckpts):
    """Raise NonFinite naming the epoch and step where a device call's loss stopped being finite,
    and what the user can do: the last good checkpoint (of `ckpts`) is intact."""
    bad = np.flatnonzero(~np.isfinite(metrics["loss"]))
    if not bad.size:
        return
    saved_steps = ckpts.steps()
    advice = (
        f"the last good checkpoint (step {saved_steps[-1]}) in {ckpts.path} is intact: rerun "
        "with a lower --learning_rate to resume from it"
        if saved_steps
        else "no checkpoint was saved yet: rerun with a lower --learning_rate"
    )
    raise NonFinite(
        f"loss became {metrics['loss'][bad[0]] / metrics['count'][bad[0]]} at epoch {epoch}, "
        f"step {first_step + bad[0] + 1}/{steps_per_epoch}; stopped without saving it; {advice}"
    )
