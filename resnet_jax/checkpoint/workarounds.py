"""Three ways the checkpoints work around orbax, each kept here with its reason upstream.

- `SaveThread`: orbax's CheckpointManager.save with async checkpointing still runs a synchronous
  part on the caller's thread before it returns (copying the arrays off the devices, writing the
  metadata, starting tensorstore's writes: ~0.1 s for the seed state's 260 arrays), so the
  devices would wait on every epoch's save. On GPU/TPU it runs on this one worker thread
  instead, on a copy of the state (`jax.device_put(..., may_alias=False)`: the train step
  donates the original); on a CPU there is no gain (the cores that would write are the ones
  training: resnet_jax.tuning's `save_thread`).
- `verify_arrays`: orbax reads all of a checkpoint's arrays at once on an asyncio loop and, when
  one read fails (a truncated or deleted data file), closes its loop with the other reads still
  in flight; their completions then print "Event loop is closed" and "Exception ignored in
  <coroutine>" tracebacks from tensorstore's threads and the garbage collector, long after the
  one line that reports the damage. Reading every array once with tensorstore's synchronous
  calls first finds the damage before orbax does (about 60 ms for the tiny model's 120 arrays).
- `quiet`: orbax logs through absl (and tensorstore and asyncio through their loggers) hundreds
  of lines for a damaged or read-only checkpoint, with tracebacks; while a checkpoint is read,
  what the reading thread logs to those loggers is dropped (a filter: no logger's level
  changes, other threads' records pass), and resnet_jax says what matters in one line.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import jax


class SaveThread:
    """One worker thread that hands saves to orbax in order, each on a copy of the state."""

    def __init__(self):
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending = None  # the save handed to the worker, until it has reached orbax

    def submit(self, write, step: int, state, *args):
        """`write(step, copy of state, *args)` on the worker; the state may be donated at once."""
        copy = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state), may_alias=False)
        self.pending = self.worker.submit(write, step, copy, *args)

    def done(self) -> bool:
        return self.pending is None or self.pending.done()

    def settled(self, raising: bool = True):
        """Wait until the save handed to the worker has reached orbax; re-raise its error
        (`raising=False`: kept for the next call, never dropped)."""
        if self.pending is not None:
            futures.wait([self.pending])
            if raising:
                pending, self.pending = self.pending, None
                pending.result()

    def shutdown(self):
        self.worker.shutdown(wait=True)


class _Threads(logging.Filter):
    """Drops the records logged by the threads inside `quiet`; other threads' pass."""

    def __init__(self):
        super().__init__()
        self.threads = set()

    def filter(self, record):
        return record.thread not in self.threads


_QUIET = _Threads()
_LOGGERS = ("absl", "asyncio", "orbax", "jax", "tensorstore")  # orbax logs through absl's


@contextlib.contextmanager
def quiet():
    """While a checkpoint is read, the loggers orbax, tensorstore and asyncio use drop what this
    thread logs (a damaged checkpoint makes them print hundreds of lines; resnet_jax says what
    matters in one). A filter on those loggers, added once, does it: no logger's level changes,
    and the records of other threads (a save in flight, the user's own) pass."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    me = threading.get_ident()
    _QUIET.threads.add(me)
    try:
        yield
    except BaseException:
        gc.collect()  # the failed read's leftover tasks log their errors when collected: now
        raise
    finally:
        _QUIET.threads.discard(me)


def verify_arrays(folder: str):
    """Read every array of an orbax OCDBT checkpoint once, one after another, with tensorstore's
    synchronous calls; raises on the first unreadable one (a truncated, deleted or overwritten
    data file).

    Done before orbax reads the checkpoint: orbax reads all arrays at once on an asyncio loop
    and, when one read fails, closes its loop with the other reads still in flight; their
    completions then print "Event loop is closed" and "Exception ignored in <coroutine>"
    tracebacks from tensorstore's threads and the garbage collector, long after the one line
    that reports the damage. Found here first, a damaged checkpoint never reaches orbax. (About
    60 ms for the tiny model's 120 arrays.) Checkpoints in another format are left to orbax."""
    import tensorstore as ts

    if not os.path.exists(os.path.join(folder, "manifest.ocdbt")):
        return
    base = {"driver": "ocdbt", "base": {"driver": "file", "path": folder + "/"}}
    keys = ts.KvStore.open(base).result().list().result()
    arrays = sorted({k.decode().rsplit("/", 1)[0] for k in keys if k.endswith(b"/.zarray")})
    for name in arrays:
        spec = {"driver": "zarr", "kvstore": {**base, "path": name + "/"}}
        try:
            ts.open(spec, open=True).result().read().result()
        except ValueError as e:  # tensorstore's status, e.g. "OUT_OF_RANGE: Error reading ..."
            raise ValueError(f"array {name} is unreadable ({str(e).split(':')[0]})") from None
