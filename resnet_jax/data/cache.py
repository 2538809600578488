"""Decoded image folders, cached in the user's cache directory so that a folder or archive is
decoded once: $XDG_CACHE_HOME/resnet_jax/images/<key>.npz (or ~/.cache/resnet_jax/images), each
entry checked against its record when read. A cache is a convenience: an entry that cannot be
written costs a warning line and the time it would have saved, never the run; a damaged one is
one warning line and decoded again. `DecodeProgress` is what a first run shows meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from resnet_jax.errors import warn
from resnet_jax.process import cache_home as home


def key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


RECORD = "_record"  # the entry's JSON record, stored beside its arrays


def digest(arrays: dict) -> str:
    """sha256 of the arrays' names, shapes, dtypes and bytes (hardware-accelerated: ~0.1 s for
    CIFAR-10's 180 MB)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {a.shape} {a.dtype.str}".encode())
        h.update(a.data)
    return h.hexdigest()


def load_arrays(kind: str, name: str, source: dict) -> dict | None:
    """The arrays saved under `name` when the entry is whole and was decoded from `source`
    (what `save_arrays` recorded: the files it came from); else None, and for an entry that is
    there but damaged, truncated, of other files or of other arrays, one warning line (it is then
    decoded again and rewritten)."""
    path = os.path.join(home(), kind, name + ".npz")
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}  # every member's CRC is checked as it is read
        record = json.loads(str(arrays.pop(RECORD)))
        if record.get("source") != source:
            raise ValueError("it was decoded from other files")
        shapes = {k: list(a.shape) for k, a in arrays.items()}
        if record.get("shapes") != shapes:
            raise ValueError(f"it holds arrays of shapes {shapes}, its record says {record.get('shapes')}")
        if record.get("digest") != digest(arrays):
            raise ValueError("its arrays differ from its record's digest")
    except Exception as e:  # noqa: BLE001 - any damage: zipfile.BadZipFile, a missing record, ...
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        warn(f"the cached decoded images in {path} are damaged ({reason}); decoding them again")
        return None
    return arrays


def save_arrays(kind: str, name: str, arrays: dict, source: dict) -> None:
    """Save arrays atomically under `name` with their record (`source`: what they were decoded
    from; their shapes and digest), checked by `load_arrays`; a failure, a full disk included, is
    one warning line (a cache is optional)."""
    from resnet_jax.atomic import replacing
    from resnet_jax.errors import DiskFull

    folder = os.path.join(home(), kind)
    record = {
        "source": source,
        "shapes": {k: list(a.shape) for k, a in arrays.items()},
        "digest": digest(arrays),
    }
    try:
        os.makedirs(folder, exist_ok=True)
        with replacing(os.path.join(folder, name + ".npz")) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays, **{RECORD: np.asarray(json.dumps(record))})
    except (OSError, DiskFull) as e:
        reason = getattr(e, "strerror", None) or e
        warn(f"cannot cache the decoded images in {folder} ({reason}); the next run decodes again")


def bar(done: int, total: int, width: int = 30) -> str:
    """Keras's progress bar: [=====>........]."""
    filled = int(width * done / max(total, 1))
    arrow = "=" * max(filled - 1, 0) + (">" if done < total else "=") if filled else ""
    return f"[{arrow:<{width}}]"


class DecodeProgress:
    """What a first run shows while an image folder is decoded into the cache: one line, with a
    progress bar on a terminal, then the time it took (later runs read the cache)."""

    def __init__(self, source: str, stream=None):
        self.source, self.stream = source, stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.began = None

    def __call__(self, done: int, total: int | None):
        head = f"Decoding the images of {self.source} into the cache, once"
        if self.began is None:
            self.began = time.monotonic()
            end = "" if self.tty else "\n"
            print(head + ("" if self.tty else "..."), end=end, file=self.stream, flush=True)
        if total is None:  # before the files are read
            return
        if self.tty:
            line = f"\r{head} {bar(done, total)} {done:,}/{total:,}\x1b[K"
            print(line, end="", file=self.stream, flush=True)
        if done == total:
            seconds = time.monotonic() - self.began
            note = f"Decoded {total:,} images in {seconds:.1f} s; later runs read them from the cache"
            print(("\n" if self.tty else "") + note, file=self.stream, flush=True)
