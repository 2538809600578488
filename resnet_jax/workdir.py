"""The work directory: its checks, its lock, run.json (config + shapes) and metrics.jsonl."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile

from resnet_jax.config import CHANGEABLE_FIELDS, FIXED_FIELDS, MODEL_FIELDS, Config
from resnet_jax.errors import UserError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"


def prepare(workdir: str) -> str:
    """Create the workdir if needed and check that it is a writable directory."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"workdir {path} is a file, not a directory; pass another --workdir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {path} ({e.strerror}); pass a writable --workdir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"workdir {path} is not writable; pass a writable --workdir")
    return path


class Lock:
    """One run per workdir: an flock on workdir/.lock, released by the kernel if the run dies."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd = None
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(
                f"workdir {os.path.dirname(self.path)} is in use by a running training "
                f"(pid {holder}); wait for it or pass another --workdir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock


def write_atomic(path: str, text: str):
    """Write via a temporary file and rename: readers see the old or the new file, never half."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def check_compatible(saved: Config, config: Config, workdir: str):
    """Refuse to resume a run with another model, data or seed (config.FIXED_FIELDS)."""
    diff = [f for f in FIXED_FIELDS if getattr(saved, f) != getattr(config, f)]
    if not diff:
        return
    what = ", ".join(f"{f} {getattr(saved, f)!r} (now {getattr(config, f)!r})" for f in diff)
    kind = "a different model" if set(diff) & set(MODEL_FIELDS) else "different data or seed"
    raise UserError(
        f"workdir {workdir} holds a run of {kind}: {what}; rerun with the same "
        "settings to resume, or pass another --workdir (nothing was deleted)"
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


HOLDOUT_FILE = "holdout.json"


def write_holdout(workdir: str, indices):
    """The held-out validation images (indices into the training set), for the record."""
    write_atomic(os.path.join(workdir, HOLDOUT_FILE), json.dumps([int(i) for i in indices]))


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


def write_run(
    workdir: str,
    config: Config,
    image_shape,
    steps_per_epoch: int,
    num_train: int,
    data: dict | None = None,
    changes=(),
):
    info = {
        "config": dataclasses.asdict(config),
        "image_shape": list(image_shape),
        "steps_per_epoch": steps_per_epoch,
        "num_train": num_train,
        "data": data,
        "changes": list(changes),
    }
    write_atomic(os.path.join(workdir, RUN_FILE), json.dumps(info, indent=1))


def rewrite_metrics(workdir: str, history):
    """metrics.jsonl = the checkpointed history, one line per completed epoch (no duplicates)."""
    write_atomic(os.path.join(workdir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in history))


def append_metrics(workdir: str, record: dict):
    with open(os.path.join(workdir, METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
