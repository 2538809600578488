"""What resnet_jax does on each platform, decided in one place (pure: nothing here starts JAX
or changes the process; resnet_jax.process applies what must be set for the whole process).

    decision                       CPU                              GPU                  TPU
    JAX devices a run uses         `auto`: one per core for models  the GPUs             the cores
                                   worth splitting, one for small
                                   ones (`run_devices`)
    glibc malloc settings          yes, before JAX starts           no                   no
    device loop (`auto`)           python: one jitted step a call   scan                 scan
    materialize block outputs      yes (model.resnet.materialize)   no                   no
    XLA flags                      none                             GPU_XLA_FLAGS        none
    checkpoint saves               inline (the cores compute)       on a worker thread   worker
    programs compiled at once      one (XLA:CPU uses every core)    up to 8              up to 8
    a new run compiles while its   no (its init compiles too)       yes                  yes
      state is initialised
    the runs of a sweep            one after another                one after another    same

Why each, with the measurements: docs/performance.md ("Where a step's time goes on a CPU", "on a
GPU", "Before epoch 1"). `decide` is pure; resnet_jax.process.current() makes the decision once
per run (train_and_evaluate, a sweep, restore, create_train_state) for the backend JAX runs on,
and it is passed down as a value: no module below asks for it again. How many devices a run uses
is the run's own decision (`run_devices`), the same in whatever process runs it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

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
    materialize: bool = False  # model.resnet.materialize on block outputs
    xla_flags: tuple[str, ...] = ()  # added to XLA_FLAGS unless the user set the same flag
    save_thread: bool = True  # orbax's synchronous part of a save on a worker thread
    compile_threads: int = 8  # programs compiled at once
    compile_early: bool = True  # a new run compiles from the state's shapes while it initialises
    runs: str = "one after another"  # how the runs of a sweep (and --seeds) execute
    cores: int | None = None  # the cores a run's decisions count (a pinned worker: the machine's)

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


def run_devices(
    platform: Platform, batch_size: int, flops_per_step: float | None, available: int, cores_=None
) -> int:
    """How many of each process's devices a run uses: a run's own decision, the same in any
    process (a sweep's runs and a notebook's calls each decide afresh). Every device off a CPU;
    on a CPU the count chosen (Platform.cpu_devices), else what its model is worth
    (`auto_cpu_devices` of its step's forward FLOPs, None when unknown), at most the devices the
    process has (`available`) and this machine's cores (`cores_`)."""
    if platform.name != "cpu":
        return available
    if platform.cpu_devices is not None:
        return min(platform.cpu_devices, available)
    cores_ = cores_ if cores_ is not None else (platform.cores or cores())
    return auto_cpu_devices(min(cores_, available), batch_size, flops_per_step)


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


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
