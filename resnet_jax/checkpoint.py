"""Orbax checkpoints of a run: the latest states and the best one by val_acc, in one manager.

Each checkpoint holds the state's arrays and a JSON `meta` record (epoch, step within the epoch,
best so far, history, running sums of a half-done epoch). Epoch-end saves carry the metric
`rank`: the epoch number when val_acc strictly improved, else -1. The preservation policy keeps
the two latest checkpoints (a corrupt newest one falls back to the one before) plus the highest
rank, which is the last strict improvement. Orbax writes to a temporary folder and renames it, so a
kill at any moment leaves every finished checkpoint readable; nothing here ever deletes one
except through that policy.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax.errors import UserError

log = logging.getLogger(__name__)
FOLDER = "checkpoints"


ARRAYS = ("step", "params", "batch_stats", "opt_state", "pixel_mean")  # a TrainState's saved fields


def arrays_of(state) -> dict:
    return {name: getattr(state, name) for name in ARRAYS}


class Checkpoints:
    def __init__(self, workdir: str, read_only: bool = False):
        self.path = os.path.join(os.path.abspath(workdir), FOLDER)
        keep = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=2),
                policies.BestN(
                    get_metric_fn=lambda m: m["rank"], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        # best_fn is needed too: without it orbax stores no metrics and BestN sees none.
        # Async saves: `save` returns once the arrays are copied off the devices and the files
        # are written in the background (the next save, `restore` and `close` wait for them).
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep,
            best_fn=lambda m: m["rank"],
            best_mode="max",
            enable_async_checkpointing=not read_only,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.path, options=options, item_names=("state", "meta"))
        self._after_save = []  # callbacks of saves still being written

    def steps(self):
        return sorted(self.manager.all_steps())

    def save(self, state, meta: dict, rank: int | None, then=None):
        """Save at the state's step; `rank` None for mid-epoch saves (not candidates for best).

        Returns once the arrays are off the devices; `then()` runs (from `poll` or `wait`) once
        the checkpoint is on disk, so what it records never gets ahead of what is saved."""
        self.wait()  # the previous save (long finished, an epoch ago) and its callbacks
        step = int(jax.device_get(state.step))
        if step not in self.steps():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(arrays_of(state)), meta=ocp.args.JsonSave(meta)
                ),
                metrics=None if rank is None else {"rank": rank},
                force=True,
            )
        if then is not None:
            self._after_save.append(then)

    def poll(self):
        """Run the callbacks of saves that have reached the disk (cheap; call it often)."""
        saving = getattr(self.manager, "is_saving_in_progress", lambda: True)  # orbax >= 0.11
        if self._after_save and not saving():
            self.wait()

    def wait(self):
        """Block until every save is on disk (raising if one failed), then run their callbacks."""
        self.manager.wait_until_finished()
        callbacks, self._after_save = self._after_save, []
        for f in callbacks:
            f()

    def best_step(self) -> int | None:
        """The last epoch whose val_acc strictly improved (orbax's best by `rank`)."""
        step = self.manager.best_step()
        return step if step is not None and self.manager.metrics(step).get("rank", -1) >= 0 else None

    def restore(self, template, which: str = "latest"):
        """(state, meta) from the chosen checkpoint, or None if there is none yet.

        `latest` falls back to older checkpoints when the newest cannot be read (and says so);
        `best` is the last epoch whose val_acc strictly improved.
        """
        self.manager.wait_until_finished()
        if which == "best":
            step = self.best_step()
            candidates = [] if step is None else [step]
        else:
            candidates = self.steps()[::-1]
        errors = []
        for step in candidates:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(arrays_of(template))),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # corrupt or foreign: try the previous one, delete nothing
                errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                log.warning("checkpoint at step %d is unreadable, trying an older one", step)
                continue
            if errors:
                print(f"warning: skipped unreadable checkpoint(s) in {self.path}: {'; '.join(errors)}")
            state = template.replace(**restored["state"])
            return state, dict(restored["meta"])
        if errors:
            raise UserError(
                f"no readable checkpoint in {self.path} ({'; '.join(errors)}); "
                "nothing was deleted: move the folder away or use another --workdir"
            )
        return None

    def close(self):
        """Finish the saves in flight (their callbacks run only if all of them succeeded)."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _abstract(tree):
    """Shapes, dtypes and placements to restore into (the default device where none is given)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default),
        tree,
    )
