"""resnet_jax's caches in the user's cache directory: decoded image folders, and XLA's persistent
compilation cache (compiled train steps, so a second run of the same shapes does not compile).

Both are conveniences: a cache that cannot be written (a full disk, a read-only home) costs a
warning line and the time it would have saved, never the run.

    $XDG_CACHE_HOME/resnet_jax (or ~/.cache/resnet_jax)
        images/<key>.npz     decoded image folders (image_folder.py)
        xla/                 jax's compilation cache (JAX_COMPILATION_CACHE_DIR, if set, wins)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
import warnings

import numpy as np

OFF = ("0", "false", "no", "off")
ENV_SWITCH = "RESNET_JAX_COMPILATION_CACHE"  # 0: no compilation cache from resnet_jax


def home(environ=None) -> str:
    """The cache root: $XDG_CACHE_HOME/resnet_jax, else ~/.cache/resnet_jax."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet_jax")


def key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def warn(text: str):
    print(f"warning: {text}", file=sys.stderr, flush=True)


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
    from resnet_jax.faults import DiskFull

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


def compilation_cache_dir(environ=None, enabled: bool = True) -> str | None:
    """Where compiled programs are cached: JAX_COMPILATION_CACHE_DIR if set (JAX reads it itself),
    else <home>/xla; None when switched off (`enabled` False or RESNET_JAX_COMPILATION_CACHE=0)."""
    environ = os.environ if environ is None else environ
    if not enabled or environ.get(ENV_SWITCH, "").strip().lower() in OFF:
        return None
    return environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(home(environ), "xla")


def enable_compilation_cache(environ=None, enabled: bool = True) -> str | None:
    """Switch JAX's persistent compilation cache on (tuning.setup, once per process): in the
    folder already set through JAX, else `compilation_cache_dir`. Every compiled program is kept
    (JAX's default keeps those over 1 s, which skips a small model's steps and makes what a run
    reads from the cache depend on the machine's load); JAX's warnings about entries it cannot
    write are left to `compiling`, which says them in one line. Returns the folder, or None."""
    import jax

    path = compilation_cache_dir(environ, enabled)
    if path is None:
        return None
    path = jax.config.jax_compilation_cache_dir or path
    try:  # a cache that cannot be written is a line here, not a warning per compiled program
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        warn(
            f"the compilation cache in {path} cannot be written ({e.strerror or e}); "
            "the run goes on without it"
        )
        return None
    warnings.filterwarnings("ignore", message=".*persistent compilation cache", category=UserWarning)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


_said: set = set()  # the cache folders whose failure this process has reported (as warnings' "once")


@contextlib.contextmanager
def compiling():
    """Compiles inside: JAX's per-entry warnings that the compilation cache could not be written
    or read become one line, saying the run goes on; other warnings pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    failures = [str(w.message) for w in caught if "persistent compilation cache" in str(w.message)]
    for w in caught:
        if "persistent compilation cache" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if failures:
        import jax

        folder = jax.config.jax_compilation_cache_dir
        if folder not in _said:  # one line a process: each compile of a run meets the same cache
            _said.add(folder)
            reason = failures[0].split(": ", 1)[-1][:200]
            warn(
                f"the compilation cache in {folder} could not be used ({reason}); compiling without it, "
                "the run goes on"
            )


def per_process(maxsize: int):
    """functools.lru_cache for what is computed from a model, an optimizer and shapes (a trace, a
    jitted function): once per process for the same arguments, so a notebook's next run and each
    seed of train_many reuse it. Arguments that cannot be hashed (a model with list fields) are
    computed afresh at each call."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            try:
                hash(args)
            except TypeError:
                return fn(*args)
            return cached(*args)

        return call

    return wrap
