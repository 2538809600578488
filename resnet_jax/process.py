"""The settings resnet_jax makes for the whole process, once, before JAX starts its backends:
the CPU's JAX devices, glibc's malloc, XLA flags, and the persistent compilation cache. `setup`
is the one function that applies them (train.py at its start; in a notebook the first run, or
`resnet_jax.configure` called first); the run's console says so in one line (`note`), and the
README lists them ("What resnet_jax changes in your process"). A device count in XLA_FLAGS or
JAX_NUM_CPU_DEVICES, any flag already in XLA_FLAGS, and RESNET_JAX_MALLOC=0 win. `current()` is
the Platform (resnet_jax.platform) of the backend JAX runs on, given to each run.

The compilation cache is a convenience: a folder that cannot be written costs a warning line and
the time it would have saved, never the run (`enable_compilation_cache`, `compiling`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import platform as host
import tempfile
import threading
import warnings

from resnet_jax.errors import say, warn
from resnet_jax.tuning import Platform, cores, decide, detect_platform

# glibc malloc (mallopt(3)): XLA:CPU mallocs a step's temporaries afresh on every call; with
# glibc's defaults each JAX thread's arena unmaps its empty heaps and maps them again, page by
# page, at the next step. One arena, no mmap for large blocks, a 1 GiB trim threshold and a
# 64 MiB top pad keep that memory mapped. They apply to the whole process (every thread then
# shares one arena) and must be set before JAX starts its threads.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
MALLOC_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
MALLOC_ENV = "RESNET_JAX_MALLOC"  # 0: leave malloc as it is


def malloc_settings(name: str, libc=None, environ=None) -> tuple:
    """The mallopt settings for a run on the platform `name`: MALLOC_SETTINGS on a CPU with glibc,
    unless RESNET_JAX_MALLOC=0; none elsewhere (GPU, TPU, musl, macOS)."""
    environ = os.environ if environ is None else environ
    libc_name, _ = host.libc_ver() if libc is None else libc
    if (
        name != "cpu"
        or libc_name != "glibc"
        or environ.get(MALLOC_ENV, "").strip().lower() in ("0", "off", "no")
    ):
        return ()
    return MALLOC_SETTINGS


def merge_xla_flags(current: str, flags) -> str:
    """XLA_FLAGS with `flags` appended, except those whose name the user's value already sets."""
    have = {f.split("=")[0] for f in current.split()}
    extra = [f for f in flags if f.split("=")[0] not in have]
    return " ".join(current.split() + extra)


def backends_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether JAX has started its backends

    return xla_bridge.backends_are_initialized()


# What `setup` did to this process (it acts once): {"malloc": applied | off | late, "cpu_devices":
# the count it set or None, "xla_flags": the flags it added, "compilation_cache": the folder or
# None, "said": whether a run's console has said so}. Process-wide by nature: it records them.
_PROCESS: dict = {}


def applied() -> dict:
    """What resnet_jax set in this process (empty before `setup`): see `setup`."""
    hidden = ("said", "per_run", "machine", "compiles")
    return {k: v for k, v in _PROCESS.items() if k not in hidden}


def setup(*, cpu_devices="auto", malloc=True, compilation_cache=True):
    """Apply resnet_jax's settings of the process, once (later calls do nothing), before JAX
    starts its backends: on a CPU glibc's malloc (`malloc=False` or RESNET_JAX_MALLOC=0: not) and
    its JAX devices (`cpu_devices`: auto, one per core, of which each run uses what its model is
    worth; or a count, every run using that many); on a GPU its XLA flags; everywhere the
    persistent compilation cache (`enable_compilation_cache`; `compilation_cache=False` or
    RESNET_JAX_COMPILATION_CACHE=0: not). Once JAX has started, only the compilation cache can
    still be switched on; malloc is then one line on stderr saying how to get it. Returns what it
    did (`applied()`), or None when the process was set up already; `note()` is the console's
    line about it."""
    name = detect_platform()
    chosen = decide("cpu", cpu_devices=cpu_devices) if cpu_devices != "auto" else None  # checked first
    if _PROCESS:
        return None
    started = backends_started()
    _PROCESS.update(
        malloc=_malloc(name, malloc, started), cpu_devices=None, per_run=False, xla_flags=(), said=False
    )
    _PROCESS["compilation_cache"] = enable_compilation_cache(enabled=compilation_cache)
    if not started:
        _before_jax_starts(name, chosen)
        _pin_a_worker(name)
    return applied()


WORKER_CORES = "RESNET_JAX_WORKER_CORES"  # a sweep's worker: the cores it runs on (runs.workers)


def _pin_a_worker(name: str, environ=None):
    """A sweep's worker (WORKER_CORES set by its parent) starts JAX with every core, as a run
    alone does, then keeps all its threads on its share of them. XLA:CPU sizes its thread pool,
    and with it how a computation is split (and so its rounding), when the backend starts:
    pinned afterwards, a worker's run is the run alone bit for bit (pinned before, not), its
    compiles given the whole machine (`compiling_as_alone`)."""
    environ = os.environ if environ is None else environ
    share = environ.get(WORKER_CORES)
    if not share or name != "cpu" or not hasattr(os, "sched_setaffinity"):
        return
    import jax

    # the machine's cores: what its runs decide by, and given back to it while it compiles
    _PROCESS["machine"] = os.sched_getaffinity(0)
    jax.devices()  # the backend and its thread pool, sized for the whole machine
    mine = {int(c) for c in share.split(",")}
    _pin_threads(mine)
    _PROCESS["pinned"] = sorted(mine)


def _before_jax_starts(name: str, chosen):
    """What of `setup` counts only before JAX starts: the XLA flags, the CPU's devices (one per
    core, of which each run takes what its model is worth; a count chosen: that many, for every
    run)."""
    import jax

    flags = decide(name).xla_flags
    if flags:
        before = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = merge_xla_flags(before, flags)
        _PROCESS["xla_flags"] = tuple(os.environ["XLA_FLAGS"].split()[len(before.split()) :])
    if name != "cpu" or _count_chosen():
        return
    n = chosen.cpu_devices if chosen is not None else cores()
    jax.config.update("jax_num_cpu_devices", n)
    _PROCESS.update(cpu_devices=n, per_run=chosen is None)


@contextlib.contextmanager
def compiling_as_alone():
    """Inside, a pinned worker compiles as a run alone on the machine does. XLA:CPU splits a
    program's loops by the cores its threads may run on when it compiles (their affinity then,
    not when the backend started): pinned, a worker compiled other programs than the run alone
    (a loss 2.5060144662857056 for 2.5060143868128457), so its threads have the whole machine
    while any compile runs (compiles may overlap: the last one out pins them again). Elsewhere
    it does nothing."""
    machine = _PROCESS.get("machine")
    if not machine:
        yield
        return
    with _COMPILES:
        _PROCESS["compiles"] = _PROCESS.get("compiles", 0) + 1
        if _PROCESS["compiles"] == 1:
            _pin_threads(machine)
    try:
        yield
    finally:
        with _COMPILES:
            _PROCESS["compiles"] -= 1
            if not _PROCESS["compiles"]:
                _pin_threads(set(_PROCESS["pinned"]))


_COMPILES = threading.Lock()  # guards _PROCESS["compiles"], the compiles running in a pinned worker


def _pin_threads(cpus) -> None:
    """Every thread of this process (those starting meanwhile inherit their parent's) on `cpus`."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def note() -> str | None:
    """The console's one line about `setup`'s settings, the first time a run asks (else None)."""
    if not _PROCESS or _PROCESS["said"]:
        return None
    _PROCESS["said"] = True
    done = []
    if _PROCESS["malloc"] == "applied":
        done.append("glibc malloc tuned for XLA:CPU")
    if _PROCESS["cpu_devices"] is not None:
        n = _PROCESS["cpu_devices"]
        each = " (each run uses as many as its model is worth)" if _PROCESS["per_run"] and n > 1 else ""
        done.append(f"the CPU as {n} JAX device{'' if n == 1 else 's'}{each}")
    if _PROCESS["xla_flags"]:
        done.append(f"XLA_FLAGS += {' '.join(f.split('=')[0] for f in _PROCESS['xla_flags'])}")
    if _PROCESS["compilation_cache"]:
        done.append(f"compiled programs cached in {_PROCESS['compilation_cache']}")
    if not done:
        return None
    return f"This process: {'; '.join(done)} (README: What resnet_jax changes in your process)"


def _malloc(name: str, enabled: bool, started: bool) -> str:
    """Apply the malloc settings: "applied", "off" (not for this platform, or opted out) or
    "late" (JAX had started: one line on stderr says how to get them)."""
    settings = malloc_settings(name) if enabled else ()
    if not settings:
        return "off"
    if started:
        say(
            "note: JAX started before resnet_jax could set malloc up for XLA:CPU (about 1.2x faster "
            "steps); import resnet_jax and call resnet_jax.configure() or train_and_evaluate before "
            "any other JAX work, or start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
        )
        return "late"
    libc = ctypes.CDLL(None)
    for param, value in settings:
        libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))
    return "applied"


def _count_chosen() -> bool:
    """Whether the CPU device count is already someone's choice: XLA_FLAGS, JAX_NUM_CPU_DEVICES,
    or jax.config (set by the user)."""
    import jax

    return bool(
        "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
        or os.environ.get("JAX_NUM_CPU_DEVICES")
        or getattr(jax.config, "jax_num_cpu_devices", -1) != -1
    )


def configure(
    config=None, cpu_devices="auto", image_shape=(32, 32, 3), *, malloc=True, compilation_cache=True
):
    """`setup` for a notebook that wants to choose first (call it before any other JAX work);
    returns the Platform decided for the platform JAX will start on (without starting it).
    `config` and `image_shape` are not needed: each run decides its own devices."""
    del config, image_shape
    setup(cpu_devices=cpu_devices, malloc=malloc, compilation_cache=compilation_cache)
    return decide(detect_platform(), cpu_devices=cpu_devices)


def current() -> Platform:
    """The Platform of the backend JAX runs on (starting it): what a run is given. On a CPU each
    run decides its devices where `setup` gave the process one per core; where the count is
    someone else's choice (yours, or JAX's when it started before `setup`) every run uses all.
    On a GPU it also creates cuDNN's and cuBLAS's handles (`warm_gpu_libraries`; microseconds
    after the first time)."""
    import jax

    name = jax.default_backend()
    per_run = _PROCESS.get("per_run", False)
    platform = decide(name, cpu_devices="auto" if per_run or name != "cpu" else jax.local_device_count())
    if _PROCESS.get("machine"):  # a pinned worker decides as a run alone on the machine
        platform = dataclasses.replace(platform, cores=len(_PROCESS["machine"]))
    if platform.name == "gpu":
        warm_gpu_libraries()
    return platform


def warm_gpu_libraries() -> None:
    """Run one convolution and one matrix product on the default device, each alone (too few
    kernels for a command buffer), so cuDNN and cuBLAS create their handles outside any CUDA
    graph: a step loaded from the compilation cache otherwise first reaches cuDNN while XLA
    records its command buffer, where no handle can be created ("Could not create cudnn handle").
    Costs one small compile the first time, microseconds after."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    k = jnp.ones((3, 3, 4, 4), jnp.float32)
    conv = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    dot = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready((conv(x, k), dot(x.reshape(8, 32), k.reshape(36, 4)[:32])))


# The persistent compilation cache, in the user's cache directory ($XDG_CACHE_HOME/resnet_jax/xla,
# or ~/.cache/resnet_jax/xla; JAX_COMPILATION_CACHE_DIR, if set, wins).
OFF = ("0", "false", "no", "off")
ENV_SWITCH = "RESNET_JAX_COMPILATION_CACHE"  # 0: no compilation cache from resnet_jax


def cache_home(environ=None) -> str:
    """resnet_jax's cache root: $XDG_CACHE_HOME/resnet_jax, else ~/.cache/resnet_jax."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet_jax")


def compilation_cache_dir(environ=None, enabled: bool = True) -> str | None:
    """Where compiled programs are cached: JAX_COMPILATION_CACHE_DIR if set (JAX reads it itself),
    else <home>/xla; None when switched off (`enabled` False or RESNET_JAX_COMPILATION_CACHE=0)."""
    environ = os.environ if environ is None else environ
    if not enabled or environ.get(ENV_SWITCH, "").strip().lower() in OFF:
        return None
    return environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_home(environ), "xla")


def enable_compilation_cache(environ=None, enabled: bool = True) -> str | None:
    """Switch JAX's persistent compilation cache on (`setup`, once per process): in the
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


def _folder_size(path: str) -> tuple[int, int]:
    """(bytes, files) under `path` (0, 0 when it is not there)."""
    total = count = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
                count += 1
    return total, count


def caches(environ=None) -> dict:
    """resnet_jax's caches on this machine: {"folder": the root, "images": the decoded image
    folders, "compiled": the compiled programs}, each {"path", "bytes", "files"}."""
    home = cache_home(environ)
    found = {"folder": home}
    compiled = compilation_cache_dir(environ) or os.path.join(home, "xla")
    for what, path in (("images", os.path.join(home, "images")), ("compiled", compiled)):
        size, files = _folder_size(path)
        found[what] = {"path": path, "bytes": size, "files": files}
    return found


def clear_caches(environ=None) -> int:
    """Remove resnet_jax's caches (decoded images, compiled programs); returns the bytes freed.
    Nothing else changes: the next run decodes and compiles what it needs again."""
    import shutil

    freed = 0
    found = caches(environ)
    for what in ("images", "compiled"):
        path = found[what]["path"]
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            freed += found[what]["bytes"] - _folder_size(path)[0]
    return freed


def megabytes(n: int) -> str:
    """A size for people: 31.8 kB, 4.2 MB."""
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.1f} MB"
