"""What resnet_jax does on each platform, decided in one place.

    decision                       CPU                              GPU                  TPU
    JAX devices                    one per core (`auto`: models     the GPUs             the cores
                                   worth splitting, see below)
    glibc malloc settings          yes, before JAX starts           no                   no
    device loop (`auto`)           python: one jitted step a call   scan                 scan
    materialize block outputs      yes (models.materialize)         no                   no
    XLA flags                      none                             GPU_XLA_FLAGS        none
    checkpoint saves               inline (the cores compute)       on a worker thread   worker
    programs compiled at once      one (XLA:CPU uses every core)    up to 8              up to 8
    a new run compiles while its   no (its init compiles too)       yes                  yes
      state is initialised
    the runs of a sweep            one after another                one after another    same

Why each, with the measurements: docs/performance.md ("Where a step's time goes on a CPU", "on a
GPU", "Before epoch 1"). Two kinds of decision live here:

- `Platform`: how a run goes on the platform JAX runs on. `decide` is pure; `current()` makes the
  decision once per run (train_and_evaluate, a sweep, restore, create_train_state), and it is
  passed down as a value: no module below asks for it again.
- The settings of the process, which must precede JAX's start: the CPU split into JAX devices,
  glibc's malloc, XLA flags, and the persistent compilation cache. `setup` is the one function
  that applies them, once per process (train.py at its start; in a notebook the first run, or
  `resnet_jax.configure` called first); the run's console says so in one line, and the README
  lists them ("What resnet_jax changes in your process"). A device count in XLA_FLAGS or
  JAX_NUM_CPU_DEVICES, any flag already in XLA_FLAGS, and RESNET_JAX_MALLOC=0 win.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import importlib.util
import os
import platform as host
import sys

from resnet_jax.errors import UserError

GPU_XLA_FLAGS = (
    "--xla_gpu_deterministic_ops=true",  # a SIGKILLed run resumes bit for bit (autotuning picks alike)
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,WHILE,"
    "CONVOLUTION,DYNAMIC_SLICE_FUSION",  # CUDA graphs: a batch-32 step is ~265 small kernels
    "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",  # independent kernels of a step at once
)

# Below this many forward FLOPs per step, one CPU device beats one per core: the step is made of
# small ops, and the cross-device BatchNorm sums cost more than the second core gives back.
SPLIT_MIN_FLOPS = 3.5e8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Platform:
    """How a run goes on one platform (see the table above)."""

    name: str  # cpu | gpu | tpu
    cpu_devices: int | None = None  # CPU: the devices every run uses (your choice); None: each
    # run uses as many of the process's devices as its model is worth (`run_devices`)
    malloc: bool = False  # CPU: glibc malloc settings for XLA:CPU's per-step temporaries
    device_loop: str = "scan"  # what Config.device_loop "auto" means: python | scan
    materialize: bool = False  # models.materialize on block outputs
    xla_flags: tuple[str, ...] = ()  # added to XLA_FLAGS unless the user set the same flag
    save_thread: bool = True  # orbax's synchronous part of a save on a worker thread
    compile_threads: int = 8  # programs compiled at once
    compile_early: bool = True  # a new run compiles from the state's shapes while it initialises
    runs: str = "one after another"  # how the runs of a sweep (and --seeds) execute

    def loop(self, asked: str) -> str:
        """The device loop of a run whose Config says `asked` (auto, scan or python)."""
        return self.device_loop if asked == "auto" else asked


def auto_cpu_devices(cores: int, batch_size: int, flops_per_step: float | None = None) -> int:
    """One device per core (the largest divisor of batch_size not above `cores`), or one device
    when the step's forward pass is smaller than SPLIT_MIN_FLOPS."""
    if flops_per_step is not None and flops_per_step < SPLIT_MIN_FLOPS:
        return 1
    return max(d for d in range(1, max(cores, 1) + 1) if batch_size % d == 0)


def decide(name: str, *, cpu_devices="auto") -> Platform:
    """Every decision for a run on `name`; `cpu_devices` a count (every run uses that many CPU
    devices) or auto (each run decides: `run_devices`)."""
    if name != "cpu":
        return Platform(name=name, xla_flags=GPU_XLA_FLAGS if name == "gpu" else ())
    n = None
    if cpu_devices != "auto" and cpu_devices is not None:
        try:
            n = int(cpu_devices)
        except (TypeError, ValueError):
            n = 0
        if n <= 0:
            raise UserError(f"cpu_devices must be 'auto' or a positive integer, got {cpu_devices!r}")
    return Platform(
        name="cpu",
        cpu_devices=n,
        malloc=True,
        device_loop="python",
        materialize=True,
        save_thread=False,
        compile_threads=1,
        compile_early=False,
    )


def step_flops(config, image_shape=(32, 32, 3), model=None) -> float:
    """The forward FLOPs of a training step: the batch times one image's (your model's, else the
    Config's), what sizes the CPU split."""
    from resnet_jax import models

    return config.batch_size * models.forward_flops(config, image_shape, model=model)


def cpu_split(config, image_shape=(32, 32, 3), model=None, cores_: int | None = None) -> int:
    """The CPU devices `auto` gives a run on `cores_` cores (this machine's): one per core for a
    model worth splitting, one for a small model (or a model that cannot be traced abstractly:
    then split, as for an unknown size)."""
    cores_ = cores() if cores_ is None else cores_
    try:
        flops = step_flops(config, image_shape, model)
    except Exception:  # noqa: BLE001 - a user's model that eval_shape cannot trace
        flops = None
    return auto_cpu_devices(cores_, config.batch_size, flops)


def run_devices(
    platform: Platform, config, image_shape=(32, 32, 3), model=None, available=None, cores_=None
) -> int:
    """How many of each process's devices a run uses: a run's own decision, the same in any
    process (a sweep's runs and a notebook's calls each decide afresh). Every device off a CPU;
    on a CPU the count chosen (Platform.cpu_devices), else what its model is worth (`cpu_split`),
    at most the devices the process has (`available`: jax.local_device_count(); `cores_`: this
    machine's)."""
    import jax

    available = jax.local_device_count() if available is None else available
    cores_ = cores() if cores_ is None else cores_
    if platform.name != "cpu":
        return available
    if platform.cpu_devices is not None:
        return min(platform.cpu_devices, available)
    return cpu_split(config, image_shape, model, min(cores_, available))


GPU_PLUGINS = (
    "jax_plugins.xla_cuda13",
    "jax_plugins.xla_cuda12",
    "jax_plugins.xla_rocm",
    "jax_cuda13_plugin",
    "jax_cuda12_plugin",
)


def detect_platform(environ=None, installed=None, devices=None) -> str:
    """The platform JAX will pick, found without starting it (starting it fixes the CPU device
    count): JAX_PLATFORMS if set, else a GPU when a CUDA or ROCm plugin is installed and the
    kernel has a GPU device, a TPU when libtpu and an accelerator device are there, else cpu.
    `installed(module)` and `devices(pattern)` (the device files matching a glob) default to
    this machine's."""
    environ = os.environ if environ is None else environ
    installed = _installed if installed is None else installed
    devices = glob.glob if devices is None else devices
    first = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if first:
        return {"cuda": "gpu", "rocm": "gpu"}.get(first, first)
    if any(installed(p) for p in GPU_PLUGINS) and (devices("/dev/nvidia[0-9]*") or devices("/dev/kfd")):
        return "gpu"
    if installed("libtpu") and (devices("/dev/accel*") or devices("/dev/vfio/[0-9]*")):
        return "tpu"
    return "cpu"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    return {k: v for k, v in _PROCESS.items() if k not in ("said", "per_run")}


def setup(*, cpu_devices="auto", malloc=True, compilation_cache=True):
    """Apply resnet_jax's settings of the process, once (later calls do nothing), before JAX
    starts its backends: on a CPU glibc's malloc (`malloc=False` or RESNET_JAX_MALLOC=0: not) and
    its JAX devices (`cpu_devices`: auto, one per core, of which each run uses what its model is
    worth; or a count, every run using that many); on a
    GPU its XLA flags; everywhere the persistent compilation cache (resnet_jax.cache;
    `compilation_cache=False` or RESNET_JAX_COMPILATION_CACHE=0: not). Once JAX has started, only
    the compilation cache can still be switched on; malloc is then one line on stderr saying how
    to get it. Returns what it did (`applied()`), or None when the process was set up already;
    `note()` is the console's line about it."""
    from resnet_jax import cache

    name = detect_platform()
    chosen = decide("cpu", cpu_devices=cpu_devices) if cpu_devices != "auto" else None  # checked first
    if _PROCESS:
        return None
    started = backends_started()
    _PROCESS.update(
        malloc=_malloc(name, malloc, started), cpu_devices=None, per_run=False, xla_flags=(), said=False
    )
    _PROCESS["compilation_cache"] = cache.enable_compilation_cache(enabled=compilation_cache)
    if not started:
        _before_jax_starts(name, chosen)
    return applied()


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
        print(
            "note: JAX started before resnet_jax could set malloc up for XLA:CPU (about 1.2x faster "
            "steps); import resnet_jax and call resnet_jax.configure() or train_and_evaluate before "
            "any other JAX work, or start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
            file=sys.stderr,
            flush=True,
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


def advice(config, image_shape=(32, 32, 3), model=None) -> str | None:
    """One line for a notebook whose JAX started before `setup`: how to get the command line's
    CPU speed for this run's model. None when nothing is to gain."""
    import jax

    if jax.default_backend() != "cpu" or jax.device_count() >= cores():
        return None  # nothing to gain (and no model to trace)
    try:
        want = cpu_split(config, image_shape, model)
    except Exception:  # noqa: BLE001 - a model that cannot be traced abstractly: no advice
        return None
    have = jax.device_count()
    if want <= have:
        return None
    return (
        f"note: JAX runs this CPU as {have} device(s); train.py would use {want} (one per core) "
        f"for about 1.5x the speed: call resnet_jax.configure(config) before any other JAX "
        f"work (e.g. first in the notebook), and start Jupyter with "
        f"GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for huge-page malloc"
    )
