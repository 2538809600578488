"""Host memory on transparent huge pages: restart a command with glibc's `glibc.malloc.hugetlb=1`.

XLA:CPU mallocs its step temporaries afresh on every call, and glibc hands large requests fresh
memory that the kernel then maps 4 KiB page by page on first touch. Measured on the seed step
(2 CPU devices, batch 32): 40,878 page faults and about 80 ms of kernel time per 238 ms step.
With the glibc tunable `glibc.malloc.hugetlb=1` (glibc 2.35+), malloc asks the kernel for
transparent huge pages (madvise) and the same step takes about 1,000 faults and 191 ms.

A tunable is read only when a process starts, so the command-line entry points (`train.py`,
`benchmarks/`) call `reexec_with_huge_pages()` first thing: it replaces the process with the same
command (`sys.orig_argv`, same interpreter) and the tunable added. It does nothing where it cannot
help or was decided already: not Linux with glibc 2.35+, the kernel's THP mode is not `madvise`
(`always` has huge pages already, `never` has none), or GLIBC_TUNABLES already names
`glibc.malloc.hugetlb` (set `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to opt out). In a notebook,
start Jupyter with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment for the same effect.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
ORIGINAL = "RESNET_JAX_GLIBC_TUNABLES_BEFORE_RESTART"  # set by the restart: what the user had


def thp_mode(path: str = THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunables_with_huge_pages(
    tunables: str | None, system: str, libc: tuple[str, str], mode: str | None
) -> str | None:
    """The GLIBC_TUNABLES value to restart with, or None when a restart would not help."""
    name, version = libc
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    if system != "Linux" or name != "glibc" or (major, minor) < (2, 35) or mode != "madvise":
        return None
    if tunables and TUNABLE in tunables:
        return None
    return f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with huge-page malloc, where that helps.

    Call it before anything else happens (no threads, files or output yet): `os.execve` keeps the
    process id, arguments, working directory, open standard streams and the rest of the
    environment, and returns only when nothing was done.
    """
    tunables = tunables_with_huge_pages(
        os.environ.get("GLIBC_TUNABLES"), platform.system(), platform.libc_ver(), thp_mode()
    )
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable,
        sys.orig_argv,
        {**os.environ, "GLIBC_TUNABLES": tunables, ORIGINAL: os.environ.get("GLIBC_TUNABLES", "")},
    )


def environ_before_restart(environ=None) -> dict:
    """The environment as the user started the command, for subprocesses that should not inherit
    the restart's tunable (benchmarks/speed.py runs the Keras baseline the way users run Keras)."""
    env = dict(os.environ if environ is None else environ)
    if ORIGINAL in env:
        original = env.pop(ORIGINAL)
        if original:
            env["GLIBC_TUNABLES"] = original
        else:
            env.pop("GLIBC_TUNABLES", None)
    return env
