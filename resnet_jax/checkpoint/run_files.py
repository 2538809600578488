"""A run's workdir and its files: the checks before anything is written, the lock, run.json
(what ran, changes, the test result), metrics.jsonl, holdout.json, and whether a folder holds a
run or a sweep. The files are written through resnet_jax.writer (process 0's gate)."""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os

from resnet_jax.atomic import write_text
from resnet_jax.config import CHANGEABLE_FIELDS, FIXED_FIELDS, MODEL_FIELDS, Config
from resnet_jax.errors import UserError, writing

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
HOLDOUT_FILE = "holdout.json"
SWEEP_FILE = "runs.json"  # a sweep's (or --seeds's) workdir: what it is; its runs in subfolders


def prepare(workdir: str) -> str:
    """Create the workdir if needed and check that it is a writable directory."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"workdir {path} is a file, not a directory; pass another --workdir")
    try:
        with writing("the workdir", path):
            os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {path} ({e.strerror}); pass a writable --workdir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"workdir {path} is not writable; pass a writable --workdir")
    return path


class InUse(UserError):
    """The workdir's lock is held by another process (a run, or a sweep writing its summary)."""


class Lock:
    """One run per workdir: an flock on workdir/.lock, released by the kernel if the run dies.
    `wait`: block until it is free (a sweep's summary) instead of refusing."""

    def __init__(self, workdir: str, wait: bool = False):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd, self.wait = None, wait

    def __enter__(self):
        with writing("the lock file", self.path):
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise InUse(
                f"workdir {os.path.dirname(self.path)} is in use by a running training "
                f"(pid {holder}); wait for it or pass another --workdir"
            ) from None
        try:
            with writing("the lock file", self.path):
                os.ftruncate(self.fd, 0)
                os.write(self.fd, str(os.getpid()).encode())
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock


def read_run(workdir: str):
    """(config, info) saved in workdir/run.json, or None for a new workdir."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        return Config.from_json(json.dumps(raw["config"])), raw
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is unreadable ({e}); it is not a resnet_jax run or was damaged. "
            "Use another --workdir (nothing was deleted)"
        ) from None


def check_compatible(
    saved: Config, config: Config, workdir: str, fields=FIXED_FIELDS, what="a run", kind=None
):
    """Refuse to go on with a saved run (or sweep: `what`, `kind`) whose `fields` differ: by
    default those a resume may not change (config.FIXED_FIELDS: the model, the data, the seed)."""
    diff = [f for f in fields if getattr(saved, f) != getattr(config, f)]
    if not diff:
        return
    differences = ", ".join(f"{f} {getattr(saved, f)!r} (now {getattr(config, f)!r})" for f in diff)
    if kind is None:
        kind = "a different model" if set(diff) & set(MODEL_FIELDS) else "different data or seed"
    same = "the same settings"
    if saved.preset and saved.preset != config.preset:  # the likely cause: the preset was left out
        same = f"--preset {saved.preset} (its preset) and the same settings"
    raise UserError(
        f"workdir {workdir} holds {what} of {kind}: {differences}; rerun with {same} "
        "to go on with it, or pass another --workdir (nothing was deleted)"
    )


def changed_settings(saved: Config, config: Config) -> dict:
    """{field: [saved, now]} of the fields a resume may change (config.CHANGEABLE_FIELDS)."""
    return {
        f: [_plain(getattr(saved, f)), _plain(getattr(config, f))]
        for f in CHANGEABLE_FIELDS
        if getattr(saved, f) != getattr(config, f)
    }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def check_data(info: dict, data: dict, workdir: str):
    """Refuse to resume on other data than the run's (counts, shape, classes, fingerprint)."""
    saved = info.get("data")
    if saved is None:  # written by an earlier version: nothing to compare
        return
    diff = [k for k in ("train", "test", "image_shape", "classes", "fingerprint") if saved[k] != data[k]]
    if diff:
        what = ", ".join(f"{k} {saved[k]} (now {data[k]})" for k in diff)
        raise UserError(
            f"workdir {workdir} holds a run trained on other data ({saved['source']}): {what}; "
            "pass the run's data to resume, or another --workdir (nothing was deleted)"
        )


def check_foreign(workdir: str):
    """Refuse a workdir holding files named like ours that resnet_jax did not write."""
    if os.path.exists(os.path.join(workdir, RUN_FILE)):
        return
    ours = (METRICS_FILE, "curves.png", "tensorboard", "checkpoints")
    found = [n for n in ours if os.path.exists(os.path.join(workdir, n))]
    if found:
        raise UserError(
            f"workdir {workdir} holds {', '.join(found)} that resnet_jax did not write (no "
            f"{RUN_FILE}); pass another --workdir (nothing was touched)"
        )


def write_holdout(workdir: str, indices):
    """The held-out validation images (indices into the training set), for the record."""
    write_text(os.path.join(workdir, HOLDOUT_FILE), json.dumps([int(i) for i in indices]))


def check_holdout(workdir: str, indices):
    """A resumed run validates on the images it held out before (refuse if they differ)."""
    path = os.path.join(workdir, HOLDOUT_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    if saved != [int(i) for i in indices]:
        raise UserError(
            f"the held-out validation images of the run in {workdir} ({HOLDOUT_FILE}) differ "
            "from this split's; resume with the run's data and --val_split, or another --workdir"
        )


def write_run(workdir: str, info: dict):
    write_text(os.path.join(workdir, RUN_FILE), json.dumps(info, indent=1))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run_info(
    saved, config: Config, train_set, steps_per_epoch: int, *, data, parts, tree, change, finished, devices
):
    """run.json's record of a run: what resnet_jax wrote it (version), its config, data, parts
    (model, optimizer, augmentation), the devices it used (this start's), the shapes of every
    saved array, the settings changed on resume, when it started and was resumed, and (once
    finished) its test result."""
    from resnet_jax import __version__

    before = saved[1] if saved else {}
    now = _now()
    return {
        "version": __version__,
        "config": dataclasses.asdict(config),
        "image_shape": list(train_set.image_shape),
        "steps_per_epoch": steps_per_epoch,
        "num_train": len(train_set.train_images),
        "data": data,
        "parts": parts,
        "devices": devices,
        "state_tree": tree,
        "changes": list(before.get("changes") or []) + ([change] if change else []),
        "started": before.get("started") or now,
        "resumed": list(before.get("resumed") or []) + ([now] if saved else []),
        "finished": before.get("finished") if finished else None,
        "test": before.get("test") if finished else None,
    }


def finished(info: dict, test, progress, step: int) -> dict:
    """run.json once the run has its Test loss / Test accuracy (of the final model)."""
    return {
        **info,
        "finished": _now(),
        "test": {
            "loss": test.mean_loss,
            "accuracy": test.accuracy,
            "model": "final (the latest checkpoint)",
            "epoch": progress.epoch,
            "step": step,
            "on": "test set",
        },
    }


def describe_data(dataset, config: Config, held_out) -> dict:
    """What run.json records of the data: source, counts, shape, classes, fingerprint, split."""
    data = dataset.describe()
    if held_out is not None:
        data.update(val_split=config.val_split, held_out=len(held_out))
    return data


def check_resume(saved, config: Config, data: dict, workdir: str) -> dict:
    """Before a checkpoint is touched: refuse another model, data or seed; return the settings
    that may change and did ({field: [saved, now]}). (The saved arrays' layout is
    checkpoint.check_tree's to check.)"""
    if saved is None:
        return {}
    check_compatible(saved[0], config, workdir)
    check_data(saved[1], data, workdir)
    return changed_settings(saved[0], config)


def rewrite_metrics(workdir: str, history):
    """metrics.jsonl = the checkpointed history, one line per completed epoch (no duplicates)."""
    write_text(os.path.join(workdir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in history))


def read_metrics(workdir: str) -> list[dict]:
    """metrics.jsonl's records, one per completed epoch."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_metrics(workdir: str, record: dict):
    path = os.path.join(workdir, METRICS_FILE)
    with writing(METRICS_FILE, path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def is_sweep(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, SWEEP_FILE))


def refuse_a_sweep(workdir: str):
    """A single run is refused in a sweep's workdir (train.py without --seeds or --sweep)."""
    if not os.path.isdir(workdir) or not is_sweep(workdir):
        return
    try:
        with open(os.path.join(workdir, SWEEP_FILE)) as f:
            saved = json.load(f)
        seeds = ",".join(str(s) for s in saved["seeds"])
        grid = saved.get("grid") or []
    except (OSError, ValueError, KeyError, TypeError):
        seeds, grid = "", []
    again = f"--seeds {seeds}" + "".join(f" --sweep {f}=..." for f, _ in grid)
    kind = "a sweep" if grid else f"a multi-run (seeds {seeds})"
    raise UserError(
        f"workdir {workdir} holds {kind}; rerun it with {again}, or train a run of it in its own "
        "folder (nothing was touched)"
    )
