"""What goes wrong, said in one line: bad input (`UserError`: the command line prints it and
exits 2), a stop with the state saved (`Interrupted`: 130), and faults of the machine
(`MachineFault`: 3).

Faults of the machine are ended like bad input, naming what ran out:
- A full disk at any write a run makes: `writing(what, path)` around each write turns the
  operating system's error into `DiskFull` naming the file; the loop adds the last complete
  checkpoint and how to resume (free space, rerun the same command). Every checkpoint written
  before stays readable: orbax writes into a temporary folder and renames it only when complete.
- Out of memory: `check_fits` compares what must sit in memory (the dataset, copied to every
  device) with what the device or host has before it is copied; XLA's RESOURCE_EXHAUSTED at
  compile or run time becomes `OutOfMemory` naming the batch, dtype, model and device memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys


class UserError(ValueError):
    """A problem with what the user gave (flags, paths, data, workdir) and how to fix it."""

    def _render_traceback_(self):  # what IPython and Jupyter show instead of a traceback: one line
        return [f"{type(self).__name__}: {self}"]


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM, or its `stop` event) and its latest state is
    saved: the same call (or command) again resumes from there."""

    def __init__(self, where: str, path: str):
        self.where, self.path = where, path
        super().__init__(f"stopped {where}; the state is saved in {path}: call it again to resume")

    def _render_traceback_(self):  # what IPython and Jupyter show instead of a traceback
        return [f"Interrupted: {self}"]


def say(text: str) -> None:
    """One line on stderr about this process's own machine or files (a cache it cannot write, a
    damaged checkpoint it skips, a Ctrl-C it saw, a setting it could not make): the one way
    resnet_jax prints outside a run's console (resnet_jax.runs.writer's gate), said by whichever
    process meets it."""
    print(text, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    say(f"warning: {text}")


EXIT_STATUS = 3  # train.py's exit status for these faults (bad input: 2, interrupted: 130)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "ENOSPC")


class MachineFault(UserError):
    """The machine ran out of something (disk, memory); the message says what to do."""

    exit_status = EXIT_STATUS


class DiskFull(MachineFault):
    def __init__(self, what: str, path: str):
        self.what, self.path = what, path
        super().__init__(f"no space left on device while writing {what} ({path})")


class OutOfMemory(MachineFault):
    pass


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is the disk or quota running out."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if any(t in str(e) for t in NO_SPACE_TEXT):
            return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error is XLA's RESOURCE_EXHAUSTED (an allocation the device could not make)."""
    return any(isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) for e in _chain(exc))


@contextlib.contextmanager
def writing(what: str, path: str):
    """Around a write: a full disk becomes DiskFull(what, path); other errors pass unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFull(what, path) from None
        raise


def host_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device) -> int | None:
    """Bytes free on an accelerator (its allocator's limit minus what is in use), None on a CPU."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports
        return None
    limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    return None if limit is None else int(limit) - int(stats.get("bytes_in_use", 0))


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


def check_fits(nbytes: int, what: str, available: int | None, where: str, fix: str = ""):
    """Refuse `nbytes` of `what` when `available` bytes (of `where`) cannot hold them."""
    if available is not None and nbytes > available:
        raise OutOfMemory(
            f"{what} needs {gib(nbytes)}, more than {where} ({gib(available)} free)"
            + (f"; {fix}" if fix else "; use a smaller dataset or a machine with more memory")
        )


def check_data_fits(nbytes: int, mesh, what: str = "the dataset"):
    """The uint8 data copied to every device of the mesh, against the memory it will sit in:
    each accelerator's own, or this machine's for CPU devices (which share it, one copy each)."""
    local = [d for d in mesh.devices.flat if d.process_index == mesh.devices.flat[0].process_index]
    device = local[0]
    if device.platform == "cpu":
        copies = f"one copy on each of {len(local)} CPU devices" if len(local) > 1 else "on the CPU device"
        check_fits(
            nbytes * len(local),
            f"{what} ({copies})",
            host_memory(),
            "this machine's available memory",
            "use fewer CPU devices (--cpu_devices 1) or a smaller dataset",
        )
    else:
        check_fits(
            nbytes,
            f"{what} (kept whole on every device)",
            device_memory(device),
            f"one {device.device_kind}",
            "use a smaller dataset, or a device with more memory",
        )


def out_of_memory(config, model_name: str, mesh) -> OutOfMemory:
    """The line for XLA's RESOURCE_EXHAUSTED while compiling or running a train call."""
    device = mesh.devices.flat[0]
    free = device_memory(device) if device.platform != "cpu" else host_memory()
    memory = f" ({gib(free)} free now)" if free is not None else ""
    smaller = max(config.batch_size // 2, mesh.size)
    hint = f"try a smaller --batch_size (e.g. {smaller})"
    if config.dtype == "float32":
        hint += " or --dtype bfloat16"
    return OutOfMemory(
        f"out of memory on {device.device_kind}{memory} at batch {config.batch_size}, "
        f"{config.dtype}, model {model_name}; {hint}"
    )


@contextlib.contextmanager
def out_of_memory_as(config, model_name: str, mesh):
    """Around compiles and device calls: XLA's RESOURCE_EXHAUSTED becomes the OutOfMemory line."""
    try:
        yield
    except MachineFault:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise out_of_memory(config, model_name, mesh) from None
        raise
