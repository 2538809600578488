"""The orbax side of a run's checkpoints: the latest states and the best one by val_acc, in one manager.

Each checkpoint holds the state's arrays and a JSON `meta` record (epoch, step within the epoch,
best so far, history, running sums of a half-done epoch). Epoch-end saves carry the metric
`rank`: the epoch number when val_acc strictly improved, else -1. The preservation policy keeps
the two latest checkpoints (a corrupt newest one falls back to the one before) plus the highest
rank, which is the last strict improvement. Orbax writes to a temporary folder and renames it, so a
kill at any moment leaves every finished checkpoint readable; nothing here ever deletes one
except through that policy.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax.checkpoint import packing
from resnet_jax.checkpoint.progress import Progress
from resnet_jax.checkpoint.workarounds import SaveThread, quiet, verify_arrays
from resnet_jax.errors import DiskFull, MachineFault, UserError, is_disk_full, warn, writing

FOLDER = "checkpoints"


class Checkpoints:
    def __init__(self, workdir: str, read_only: bool = False, save_thread: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), FOLDER)
        keep = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=2),
                policies.BestN(
                    get_metric_fn=lambda m: m["rank"],
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        # best_fn is needed too: without it orbax stores no metrics and BestN sees none.
        # Async saves: `save` returns once the arrays are copied off the devices and the files
        # are written in the background (the next save, `restore` and `close` wait for them).
        with quiet():  # read-only: absl says "Given directory is read only" otherwise
            options = ocp.CheckpointManagerOptions(
                preservation_policy=keep,
                best_fn=lambda m: m["rank"],
                best_mode="max",
                enable_async_checkpointing=not read_only,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
            )
            self.manager = ocp.CheckpointManager(
                self.path, options=options, item_names=("state", "meta", "layout")
            )
        self._after_save = []  # callbacks of saves still being written
        # `save_thread`: orbax's own synchronous part of a save (~0.1 s for the seed state's 260
        # arrays) runs on this thread, so the devices train on meanwhile; one thread keeps the
        # saves in order. Without it (resnet_jax.tuning: on a CPU) `save` writes the checkpoint
        # and returns once it is on disk and its callbacks ran: the cores a background write
        # would use are the ones training, and a disk that fills up is then met by the next
        # save's room check rather than in the middle of orbax's write (see `_check_room`).
        self._thread = SaveThread() if save_thread and not read_only else None

    def steps(self):
        self._settled(raising=False)
        return sorted(self.manager.all_steps())

    def save(self, state, meta: dict, rank: int | None, then=None):
        """Save the state's arrays (every array field of the pytree) at its step; `rank` None for
        mid-epoch saves (not candidates for best).

        Returns once the arrays are copied on the devices (the next train call may donate the
        originals); orbax takes them off the devices and writes them on a worker thread and in
        the background. `then()` runs (from `poll` or `wait`) once the checkpoint is on disk, so
        what it records never gets ahead of what is saved. A full disk raises faults.DiskFull:
        here when the disk has no room for the checkpoint's arrays (orbax never starts the
        write), else from the next `poll`, `wait` or `save`; an incomplete checkpoint stays a
        temporary folder that the next run removes."""
        self.wait()  # the previous save (long finished, an epoch ago) and its callbacks
        step = int(jax.device_get(state.step))
        if step not in self.steps():
            self._check_room(state, step)
            if self._thread is None:
                self._write(step, state, meta, rank)  # returns once orbax has the arrays off the devices
            else:
                self._thread.submit(self._write, step, state, meta, rank)
        if then is not None:
            self._after_save.append(then)
        if self._thread is None:
            self.wait()

    def _check_room(self, state, step: int):
        """Refuse a save the disk has no room for, before orbax starts it: a write that fails
        inside orbax abandons its other writes in flight, whose completions then print
        tracebacks from tensorstore's threads. (A disk that fills during the write still fails
        there, as DiskFull.)"""
        need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)) + (1 << 20)
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return
        if free < need:
            raise DiskFull(f"the checkpoint of step {step}", self.path)

    def _write(self, step: int, state, meta: dict, rank: int | None):
        """The state's arrays packed (checkpoint.packing: one array per dtype) and its meta."""
        packed, layout = packing.pack(state)
        items = dict(state=ocp.args.StandardSave(packed), meta=ocp.args.JsonSave(meta))
        with writing(f"the checkpoint of step {step}", self.path), quiet():  # orbax's log lines
            self.manager.save(
                step,
                args=ocp.args.Composite(**items, layout=ocp.args.JsonSave(layout)),
                metrics=None if rank is None else {"rank": rank},
                force=True,
            )

    def _settled(self, raising: bool = True):
        """The save handed to the save thread (if any) has reached orbax (`SaveThread.settled`)."""
        if self._thread is not None:
            self._thread.settled(raising)

    def poll(self):
        """Run the callbacks of saves that have reached the disk (cheap; call it often)."""
        if not self._after_save or (self._thread is not None and not self._thread.done()):
            return
        saving = getattr(self.manager, "is_saving_in_progress", lambda: True)  # orbax >= 0.11
        if not saving():
            self.wait()

    def wait(self):
        """Block until every save is on disk (raising if one failed), then run their callbacks."""
        self._settled()
        with writing("a checkpoint (in the background)", self.path):
            self.manager.wait_until_finished()
        callbacks, self._after_save = self._after_save, []
        for f in callbacks:
            f()

    def best_step(self) -> int | None:
        """The last epoch whose val_acc strictly improved (orbax's best by `rank`)."""
        self._settled(raising=False)
        with quiet():
            step = self.manager.best_step()
            metrics = self.manager.metrics(step) if step is not None else None
        return step if metrics and metrics.get("rank", -1) >= 0 else None

    def restore(self, template, which: str = "latest", set_aside_damaged: bool = False):
        """(state, meta, step) from the chosen checkpoint, or None if there is none yet.

        `latest` falls back to older checkpoints when the newest cannot be read (one warning line
        on stderr); with `set_aside_damaged` (a run about to train) the unreadable newer ones are
        moved to checkpoints.damaged/ so that the next saves replace them. `best` is the last
        epoch whose val_acc strictly improved. Raises UserError when nothing chosen is readable.
        """
        self._settled(raising=False)
        self.manager.wait_until_finished()
        if which == "best":
            step = self.best_step()
            candidates = [] if step is None else [step]
        else:
            candidates = self.steps()[::-1]
        errors = []
        for step in candidates:
            try:
                restored = self._read(step, template)
            except Exception as e:  # noqa: BLE001 - corrupt or foreign: try the previous one
                errors.append((step, _reason(e)))
                continue
            if errors:
                moved = self._set_aside([s for s, _ in errors]) if set_aside_damaged else ""
                warn(
                    f"unreadable checkpoint(s) in {self.path} ({_listing(errors)}); using step {step}{moved}"
                )
            return restored["state"], dict(restored["meta"]), step
        if errors:
            raise UserError(
                f"no readable {which} checkpoint in {self.path} ({_listing(errors)}); "
                "nothing was deleted: move the folder away or use another --workdir"
            )
        return None

    def read_meta(self, step: int) -> dict | None:
        """The JSON meta of a checkpoint, or None when it cannot be read."""
        try:
            with quiet():
                args = ocp.args.Composite(meta=ocp.args.JsonRestore())
                return dict(self.manager.restore(step, args=args)["meta"])
        except Exception:  # noqa: BLE001 - unreadable
            return None

    def _read(self, step, template):
        """The checkpoint restored into `template` (shapes, dtypes, placements), or as saved
        (plain nested dicts of arrays on the default device) when the template is None. A
        checkpoint written before packing holds one orbax array per state array."""
        folder = os.path.join(self.path, str(step))
        verify_arrays(os.path.join(folder, "state"))
        like = None if template is None else _abstract(template)
        if os.path.isdir(os.path.join(folder, "layout")):
            args = dict(state=ocp.args.StandardRestore(), layout=ocp.args.JsonRestore())
            with quiet():
                read = self.manager.restore(
                    step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore())
                )
            return {"state": packing.unpack(read["state"], read["layout"], like), "meta": read["meta"]}
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        item = (
            ocp.args.StandardRestore(fallback_sharding=default)
            if like is None
            else ocp.args.StandardRestore(like)
        )
        with quiet():
            return self.manager.restore(
                step, args=ocp.args.Composite(state=item, meta=ocp.args.JsonRestore())
            )

    def _set_aside(self, steps) -> str:
        """Move unreadable checkpoints to checkpoints.damaged/ (kept for the user, out of the way)."""
        aside = self.path + ".damaged"
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            src = os.path.join(self.path, str(step))
            if os.path.exists(src):
                os.replace(src, os.path.join(aside, f"{step}-{int(time.time())}"))
        self.manager.reload()
        return f"; the unreadable ones were moved to {aside}"

    def close(self, wait: bool = True):
        """Finish the saves in flight (their callbacks run only if all of them succeeded);
        `wait=False` after a failure: nothing more is raised or recorded."""
        try:
            if wait:
                self.wait()
        finally:
            self._settled(raising=False)
            if self._thread is not None:
                self._thread.shutdown()
            try:
                if not wait:  # let a write in flight end (it may fail too) before orbax closes
                    with contextlib.suppress(Exception), quiet():
                        self.manager.wait_until_finished()
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failure that got here was raised already
                if wait:
                    raise

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        """After the run: every save finished and recorded. After an error: the same, unless the
        error is a full disk (then nothing more is written); a second error while finishing is
        dropped, the first one says what matters."""
        if kind is None:
            self.close()
            return
        try:
            self.close(wait=not is_disk_full(value))
        except Exception:  # noqa: BLE001
            pass


def last_complete_line(workdir: str) -> str:
    """Where a run stands on disk after a failure: its last complete checkpoint, and what to do."""

    folder = os.path.join(os.path.abspath(workdir), FOLDER)
    steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []
    for step in steps[::-1]:
        try:
            with Checkpoints(workdir, read_only=True) as ckpts:
                meta = ckpts.read_meta(step)
        except Exception:  # noqa: BLE001 - unreadable: try an older one
            meta = None
        if meta is not None:
            where = Progress.from_meta(meta).where()
            return (
                f"the last complete checkpoint is {where} (step {step}) in {folder}; "
                "free space and rerun the same command to resume"
            )
    return "no checkpoint was written yet; free space and rerun the same command"


@contextlib.contextmanager
def resumable_on_full_disk(workdir: str):
    """A full disk anywhere inside ends in one line that adds where the run stands on disk."""
    try:
        yield
    except DiskFull as e:
        raise MachineFault(f"{e}; {last_complete_line(workdir)}") from None


def exists(workdir: str) -> bool:
    """Whether the workdir holds a checkpoint folder with at least one step in it."""
    folder = os.path.join(os.path.abspath(workdir), FOLDER)
    return os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))


def _reason(e: Exception) -> str:
    """The first line of an error, without the bound-method and object reprs some libraries add."""
    text = re.sub(r"<[^<>]*(bound method|object at 0x)[^<>]*>?", "", str(e))
    text = text.split("See full TensorStore details")[0].strip().rstrip(".:")
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


def _listing(errors) -> str:
    return "; ".join(f"step {step}: {reason}" for step, reason in errors)


def _abstract(tree):
    """Shapes, dtypes and placements to restore into (the default device where none is given)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default),
        tree,
    )
