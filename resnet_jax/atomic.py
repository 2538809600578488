"""A file written whole or not at all: into a temporary file in the same folder, then renamed
over the target, so a reader (or a run killed mid-write) sees the old file or the new one,
never half. A full disk leaves the old file and raises faults.DiskFull naming it."""

from __future__ import annotations

import contextlib
import os
import tempfile

from resnet_jax.errors import writing


@contextlib.contextmanager
def replacing(path: str, what: str | None = None):
    """Yields a temporary path beside `path` to write; renames it over `path` when the block
    ends without error, else removes it. `what` names the file in a DiskFull error."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with writing(what or os.path.basename(path), path):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
            os.close(fd)
            os.chmod(tmp, 0o644)
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str, what: str | None = None):
    """`text` into `path`, whole or not at all."""
    with replacing(path, what) as tmp, open(tmp, "w") as f:
        f.write(text)
