"""Platform decisions, in one place: what resnet_jax switches on for the platform JAX runs on.

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
    the seeds of one command       one after another                one after another    same

Each CPU choice is measured in docs/performance.md; the GPU flags on an H200
(benchmarks/results/gpu.jsonl): deterministic ops make a SIGKILLed run resume bit for bit
(without them XLA's autotuner may pick other kernels after a restart: the resumed run differed in
the 6th digit), at -16 % images/s alone; command buffers (CUDA graphs) for every kind of op,
loops included, win it back: seed model, batch 32, float32: 17,626 images/s with XLA's
defaults, 14,869 deterministic, 19,844 with command buffers, 18,330 with both; and scheduled
CONCURRENT (independent kernels of a step at once, not XLA's serial LHS order): 28,026 against
20,138 in the same run (2026-11-30), the SIGKILL exact-resume test still passing. (CONCURRENT lets
buffer assignment pack temporaries less tightly: more peak memory, small for these models.) On a
GPU `started` also runs `warm_gpu_libraries`. Flags the user sets in XLA_FLAGS win over these.

glibc malloc (MALLOC_SETTINGS): XLA:CPU mallocs a step's temporaries afresh on every call. With
glibc's defaults each JAX thread has its own arena, whose heaps are unmapped as soon as they are
empty and mapped again (4 KiB page by page, tens of thousands of faults) at the next step. One
arena, no mmap for large blocks, a 1 GiB trim threshold and a 64 MiB top pad keep that memory
mapped: measured on the seed step, 6.2 M page faults and 22 s of kernel time per 120 steps become
78 k and 0.9 s, 610 -> 513 ms a step (docs/performance.md). They must be set before JAX starts its
CPU threads (their arenas exist from then on): `configure` (train.py, rj.configure) or, in a
notebook, the first `train_and_evaluate` / `create_train_state` do it, once, unless JAX started
first (one line then says how to get them) or RESNET_JAX_MALLOC=0 opts out. They apply to the
whole process: every thread then shares one malloc arena.

`decide` is pure. The decisions that must precede JAX's start (CPU device count, XLA flags,
malloc) are applied by `configure`, which train.py and the benchmarks call before JAX starts its
backends; a notebook gets the same by calling `resnet_jax.configure(config)` first
(`train_and_evaluate` says so in one line when the CPU split differs from what `configure` would
choose).
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
    "--xla_gpu_deterministic_ops=true",
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,WHILE,"
    "CONVOLUTION,DYNAMIC_SLICE_FUSION",
    "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",
)

# Below this many forward FLOPs per step, one CPU device beats one per core: the step is
# made of small ops and the cross-device BatchNorm sums cost more than the second core gives back.
# Measured on 2 cores, batch 32 (`benchmarks/speed.py --cpu_devices 1|2`, images/s):
#   4 filters 1,1,1 (0.06 GFLOP/step): 2,565 vs 2,114     8 filters 1,1,1 (0.21): 2,059 vs 1,718
#   8 filters 3,3,2 (0.58):            513 vs 676         16 filters 1,1,1 (0.80): 839 vs 1,046
#   seed, 32 filters 3,3,2 (9.2):      86 vs 130
SPLIT_MIN_FLOPS = 3.5e8


@dataclasses.dataclass(frozen=True)
class Tuning:
    platform: str  # cpu | gpu | tpu
    cpu_devices: int | None  # CPU: JAX devices to split the host into; None elsewhere
    malloc: bool  # CPU: glibc malloc settings for XLA:CPU's per-step temporaries (MALLOC_SETTINGS)
    device_loop: str  # what Config.device_loop "auto" means: python | scan
    materialize: bool  # models.materialize on block outputs
    xla_flags: tuple[str, ...]  # added to XLA_FLAGS unless the user set the same flag
    # orbax's synchronous part of a save on a worker thread, while the devices train: on a GPU
    # 0.38 -> 0.06 s between epochs (H200); on a CPU the cores it would free are the ones
    # computing, and a stop request would wait for it (docs/performance.md)
    save_thread: bool = False
    # How `train.py --seeds` / `train_many` run the seeds: one after another everywhere today.
    # On a CPU several runs in one program cost more than one after another (vmap 8.4x a step
    # for 4 states, 4.4x stepped in one jitted call, against 4x); on a GPU it is measured by
    # benchmarks/many_runs.py (issue 31) before a faster way is chosen here.
    seeds: str = "one after another"
    # How many programs (train-call shapes, the evaluation) compile at once. XLA:CPU already
    # spreads one compile over the cores: two at once on 2 cores took 8.2-9.8 s against 6.2-7.4 s
    # one after the other, and the steps that followed ran 10-15 % slower (docs/performance.md).
    # On a GPU the host's cores are free while XLA compiles for the device.
    compile_threads: int = 8
    # A new run's programs compile on a thread from the state's shapes while its state is
    # initialised (loop.Programs): on a GPU the host's cores are idle meanwhile. On a CPU the
    # initialisation compiles too, and two compiles at once are slower (compile_threads).
    compile_early: bool = True


def auto_cpu_devices(cores: int, batch_size: int, flops_per_step: float | None = None) -> int:
    """One device per core (the largest divisor of batch_size not above `cores`), or one device
    when the step's forward pass is smaller than SPLIT_MIN_FLOPS."""
    if flops_per_step is not None and flops_per_step < SPLIT_MIN_FLOPS:
        return 1
    return max(d for d in range(1, max(cores, 1) + 1) if batch_size % d == 0)


def decide(
    platform: str,
    *,
    cores: int = 1,
    batch_size: int = 32,
    flops_per_step: float | None = None,
    cpu_devices="auto",
) -> Tuning:
    """Every platform decision for a run of `batch_size` whose step costs `flops_per_step`."""
    if platform != "cpu":
        return Tuning(platform, None, False, "scan", False, GPU_XLA_FLAGS if platform == "gpu" else (), True)
    if cpu_devices == "auto":
        n = auto_cpu_devices(cores, batch_size, flops_per_step)
    else:
        try:
            n = int(cpu_devices)
        except (TypeError, ValueError):
            n = 0
        if n <= 0:
            raise UserError(f"cpu_devices must be 'auto' or a positive integer, got {cpu_devices!r}")
    return Tuning("cpu", n, True, "python", True, (), compile_threads=1, compile_early=False)


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


# mallopt(3) parameters: one arena for every thread, no mmap for large blocks, keep up to 1 GiB of
# free memory at the heap's top, grow it 64 MiB at a time.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
MALLOC_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
MALLOC_ENV = "RESNET_JAX_MALLOC"  # 0: leave malloc as it is
_malloc = {"done": None}  # process-wide settings are applied (or refused) once: "applied", "off", "late"


def malloc_settings(platform: str, libc=None, environ=None) -> tuple:
    """The mallopt settings for a run on `platform`: MALLOC_SETTINGS on a CPU with glibc, unless
    RESNET_JAX_MALLOC=0; none elsewhere (GPU, TPU, musl, macOS)."""
    environ = os.environ if environ is None else environ
    name, _ = host.libc_ver() if libc is None else libc
    if (
        platform != "cpu"
        or name != "glibc"
        or environ.get(MALLOC_ENV, "").strip().lower() in ("0", "off", "no")
    ):
        return ()
    return MALLOC_SETTINGS


def tune_malloc(platform: str, enabled: bool = True) -> str | None:
    """Apply the malloc settings once, before JAX starts its threads; returns what happened:
    "applied", "off" (not for this platform or opted out), "late" (JAX had started: one line on
    stderr says how to get them), or None (decided already, earlier in this process)."""
    if _malloc["done"] is not None:
        return None
    settings = malloc_settings(platform) if enabled else ()
    if not settings:
        _malloc["done"] = "off"
    elif backends_started():
        _malloc["done"] = "late"
        print(
            "note: JAX started before resnet_jax could set malloc up for XLA:CPU (about 1.2x faster "
            "steps); import resnet_jax and call resnet_jax.configure() or train_and_evaluate before "
            "any other JAX work, or start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
            file=sys.stderr,
            flush=True,
        )
    else:
        libc = ctypes.CDLL(None)
        for param, value in settings:
            libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))
        _malloc["done"] = "applied"
    return _malloc["done"]


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


def configure(
    config=None,
    cpu_devices="auto",
    image_shape=(32, 32, 3),
    *,
    malloc: bool = True,
    compilation_cache: bool = True,
) -> Tuning:
    """Apply the decisions that must come before JAX starts its backends; returns them all.

    `config` sizes the CPU split (`auto` keeps small models on one device). On a CPU with glibc
    sets malloc up for XLA:CPU (`malloc=False` or RESNET_JAX_MALLOC=0: not). Switches on the
    persistent compilation cache (resnet_jax.cache; `compilation_cache=False` or
    RESNET_JAX_COMPILATION_CACHE=0: not). Does nothing to JAX once its backends are up (the
    decisions are still returned). A device count in XLA_FLAGS or JAX_NUM_CPU_DEVICES, and any
    flag already in XLA_FLAGS, win. Every setting here is process-wide.
    """
    import jax

    from resnet_jax import cache, models

    platform = detect_platform()
    tune_malloc(platform, enabled=malloc)
    cache.enable_compilation_cache(enabled=compilation_cache)
    flops = None
    batch_size = 32
    if config is not None:
        batch_size = config.batch_size
        if platform == "cpu":  # only the CPU split depends on the model's size
            flops = batch_size * models.forward_flops(config, image_shape)
    tuning = decide(
        platform, cores=cores(), batch_size=batch_size, flops_per_step=flops, cpu_devices=cpu_devices
    )
    if backends_started():
        return tuning
    if tuning.xla_flags:
        os.environ["XLA_FLAGS"] = merge_xla_flags(os.environ.get("XLA_FLAGS", ""), tuning.xla_flags)
    if tuning.cpu_devices is not None and not _count_chosen():
        jax.config.update("jax_num_cpu_devices", tuning.cpu_devices)
    return tuning


def _count_chosen() -> bool:
    """Whether the CPU device count is already someone's choice: XLA_FLAGS, JAX_NUM_CPU_DEVICES,
    or jax.config (set by `configure`, or by the user)."""
    import jax

    return bool(
        "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
        or os.environ.get("JAX_NUM_CPU_DEVICES")
        or getattr(jax.config, "jax_num_cpu_devices", -1) != -1
    )


def split_for(config, image_shape=(32, 32, 3), model=None) -> None:
    """Before JAX starts on a CPU, with no device count chosen yet: the split train.py makes for
    this run (one device per core, or one for a small model), so a notebook's first
    `train_and_evaluate` runs at the command line's speed without `configure`. The step's size is
    read off `model` (yours) when given, else the Config's; a model that cannot be traced
    abstractly leaves JAX's default (one device). Does nothing once JAX has started."""
    import jax

    from resnet_jax import models

    if backends_started() or detect_platform() != "cpu" or _count_chosen():
        return
    try:
        flops = config.batch_size * models.forward_flops(config, image_shape, model=model)
    except Exception:  # noqa: BLE001 - a user's model that eval_shape cannot trace: keep the default
        return
    n = auto_cpu_devices(cores(), config.batch_size, flops)
    if n > 1:
        jax.config.update("jax_num_cpu_devices", n)


def started() -> Tuning:
    """The decisions for the platform JAX runs on (device loop, materialize), starting JAX if it
    has not started: the malloc settings come first then, as in `configure`, and the persistent
    compilation cache is switched on unless `configure` (train.py) decided otherwise."""
    import jax

    from resnet_jax import cache

    cache.enable_compilation_cache(default=True)  # unless train.py or configure decided
    if not backends_started():
        tune_malloc(detect_platform())
    elif _malloc["done"] is None:
        tune_malloc(jax.default_backend())  # too late: one line says how to get them
    tuning = decide(jax.default_backend())
    if tuning.platform == "gpu":
        warm_gpu_libraries()
    return tuning


def warm_gpu_libraries() -> None:
    """Run one convolution and one matrix product on the default device, each alone (too few
    kernels for a command buffer), so cuDNN and cuBLAS create their handles outside any CUDA
    graph. Without it a step loaded from the compilation cache (no autotuning, so no library call
    yet) first reaches cuDNN while XLA records its command buffer, where the handle cannot be
    created: "Could not create cudnn handle ... No DNN support for stream" (H200, jax 0.11.2,
    benchmarks/results/gpu.jsonl). Costs one small compile the first time, microseconds after."""
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


def advice(config) -> str | None:
    """One line for a notebook whose JAX started before `configure`: how to get the command
    line's CPU speed. None when nothing is to gain."""
    import jax

    from resnet_jax import models

    if jax.default_backend() != "cpu" or jax.device_count() >= cores():
        return None  # nothing to gain (and no model to trace)
    want = auto_cpu_devices(cores(), config.batch_size, config.batch_size * models.forward_flops(config))
    have = jax.device_count()
    if want <= have:
        return None
    return (
        f"note: JAX runs this CPU as {have} device(s); train.py would use {want} (one per core) "
        f"for about 1.5x the speed: call resnet_jax.configure(config) before any other JAX "
        f"work (e.g. first in the notebook), and start Jupyter with "
        f"GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for huge-page malloc"
    )
