"""Platform decisions (resnet_jax.tuning): what each platform switches on, made before JAX starts."""

import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import process, tuning
from resnet_jax.model import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_cpu_devices_splits_only_models_worth_splitting():
    tiny, seed = rj.presets.tiny(), rj.Config()
    flops = {c: 32 * rj.model.resnet.forward_flops(c) for c in (tiny, seed)}
    assert tuning.auto_cpu_devices(2, 32, flops[tiny]) == 1  # overhead-bound: one device
    assert tuning.auto_cpu_devices(2, 32, flops[seed]) == 2  # one device per core
    assert tuning.auto_cpu_devices(4, 30, flops[seed]) == 3  # a divisor of the batch
    assert tuning.auto_cpu_devices(16, 7, flops[seed]) == 7
    assert tuning.auto_cpu_devices(2, 32) == 2  # size unknown: split


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_nothing_cpu_specific_off_the_cpu(platform):
    t = tuning.decide(platform)
    assert t.cpu_devices is None and not t.malloc and not t.materialize
    assert t.device_loop == "scan"
    assert ("--xla_gpu_deterministic_ops=true" in t.xla_flags) == (platform == "gpu")
    assert t.compile_threads > 1  # the host's cores are free while XLA compiles for the device


def test_a_gpu_start_creates_the_library_handles_outside_command_buffers(monkeypatch):
    # On a GPU, a step loaded from the compilation cache first reached cuDNN while XLA recorded
    # its CUDA graph ("Could not create cudnn handle"; docs/performance.md): current() runs one
    # lone convolution and matrix product first. Here: it is called on a GPU, not elsewhere,
    # and its computation runs (on the CPU).
    calls = []
    monkeypatch.setattr(process, "warm_gpu_libraries", lambda: calls.append(1))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert process.current().name == "gpu" and calls == [1]
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert process.current().name == "cpu" and calls == [1]
    monkeypatch.undo()
    process.warm_gpu_libraries()  # the real one: a convolution and a product that run


def test_the_cpu_choice():
    t = tuning.decide("cpu")  # each run decides its devices: the seed model one per core, tiny one
    seed, tiny = (resnet.step_flops(c) for c in (rj.Config(), rj.presets.tiny()))
    n = tuning.run_devices(t, 32, seed, available=2, cores_=2)
    assert tuning.run_devices(t, 32, tiny, available=2, cores_=2) == 1 and t.cpu_devices is None
    assert tuning.run_devices(t, 32, seed, available=1, cores_=2) == 1  # what the process has
    assert (n, t.malloc, t.device_loop, t.materialize, t.xla_flags) == (
        2,
        True,
        "python",
        True,
        (),
    )
    assert t.compile_threads == 1  # XLA:CPU spreads one compile over the cores already
    chosen = tuning.decide("cpu", cpu_devices="3")
    assert chosen.cpu_devices == 3 and tuning.run_devices(chosen, 32, tiny, available=8, cores_=8) == 3
    with pytest.raises(rj.UserError, match="cpu_devices must be 'auto' or a positive integer"):
        tuning.decide("cpu", cpu_devices="many")


@pytest.mark.slow
def test_programs_compile_as_many_at_once_as_the_platform_says(monkeypatch):
    # compile_all's threads follow tuning.Platform.compile_threads: on this CPU one program at a
    # time; with the GPU's decision, several at once.
    from resnet_jax.device import programs

    def jobs(tag):
        now, most, lock = [0], [0], threading.Lock()

        class Lowered:
            def compile(self):
                with lock:
                    now[0] += 1
                    most[0] = max(most[0], now[0])
                time.sleep(0.2)
                with lock:
                    now[0] -= 1
                return tag

        return [((tag, i), Lowered) for i in range(3)], most

    work, most = jobs("cpu-test")
    threads = process.current().compile_threads  # this CPU's decision
    assert programs.compile_all(work, threads) == ["cpu-test"] * 3 and most[0] == 1
    work, most = jobs("gpu-test")
    assert (
        programs.compile_all(work, tuning.decide("gpu").compile_threads) == ["gpu-test"] * 3 and most[0] == 3
    )
    programs.forget()


def test_platform_detection_honours_jax_platforms():
    assert tuning.detect_platform({"JAX_PLATFORMS": "cpu"}) == "cpu"
    assert tuning.detect_platform({"JAX_PLATFORMS": "cuda,cpu"}) == "gpu"
    assert tuning.detect_platform({"JAX_PLATFORMS": "tpu"}) == "tpu"

    # Without JAX_PLATFORMS: what is installed and which device files the kernel has.
    def machine(modules=(), files=()):
        return dict(
            installed=lambda m: m in modules,
            devices=lambda pattern: [f for f in files if __import__("fnmatch").fnmatch(f, pattern)],
        )

    assert tuning.detect_platform({}, **machine()) == "cpu"
    assert tuning.detect_platform({}, **machine(["jax_plugins.xla_cuda12"], ["/dev/nvidia0"])) == "gpu"
    assert tuning.detect_platform({}, **machine(["jax_plugins.xla_cuda12"])) == "cpu"  # plugin, no GPU
    assert tuning.detect_platform({}, **machine(files=["/dev/nvidia0"])) == "cpu"  # GPU, no plugin
    assert tuning.detect_platform({}, **machine(["jax_plugins.xla_rocm"], ["/dev/kfd"])) == "gpu"
    assert tuning.detect_platform({}, **machine(["libtpu"], ["/dev/accel0"])) == "tpu"
    assert tuning.detect_platform({"JAX_PLATFORMS": "cpu"}, **machine(["libtpu"], ["/dev/accel0"])) == "cpu"


def test_users_xla_flags_win():
    merged = process.merge_xla_flags("--xla_gpu_deterministic_ops=false --foo=1", tuning.GPU_XLA_FLAGS)
    assert "--xla_gpu_deterministic_ops=false" in merged.split()
    assert "--xla_gpu_deterministic_ops=true" not in merged
    assert any(f.startswith("--xla_gpu_enable_command_buffer=") for f in merged.split())
    assert process.merge_xla_flags("", ()) == ""


def test_materialize_is_an_exact_identity_for_inf_and_nan_too():
    x = jnp.array([1.5, -2.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, 3e38, -1e-30])
    y = jax.jit(rj.model.resnet.materialize)(x)
    np.testing.assert_array_equal(y[:6], x[:6])  # NaN == NaN for assert_array_equal
    assert y[6] == x[6] and np.isnan(y[5]) and np.isposinf(y[3]) and np.isneginf(y[4])


@pytest.mark.slow
def test_materialize_is_a_model_setting_the_cpu_decision_turns_on():
    config = rj.presets.tiny()
    on = rj.create_train_state(config, jax.random.key(0), (32, 32, 3), 5, materialize=True)
    off = rj.create_train_state(config, jax.random.key(0), (32, 32, 3), 5, materialize=False)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    hlo = lambda s: (
        jax.jit(lambda v: s.model.apply(v, x, train=False))
        .lower({"params": s.params, "batch_stats": s.batch_stats})
        .as_text()
    )
    # off: the global-average pool's one division; on: one more per block output and the stem
    assert hlo(off).count("stablehlo.divide") == 1 and hlo(on).count("stablehlo.divide") == 5
    np.testing.assert_array_equal(
        *(
            s.model.apply({"params": s.params, "batch_stats": s.batch_stats}, x, train=False)
            for s in (on, off)
        )
    )
    default = rj.create_train_state(config, jax.random.key(0), (32, 32, 3), 5)
    assert default.model.materialize == (jax.default_backend() == "cpu")


@pytest.mark.slow
def test_help_and_argument_errors_start_once():
    """No huge-page restart for --help or a bad flag (the restart would print the marker twice)."""
    code = (
        "import sys; print('PROCESS-START', flush=True); from resnet_jax.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    for args in (["--help"], ["--epochs", "0"], ["--no_such_flag"]):
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.count("PROCESS-START") == 1, (args, proc.stdout, proc.stderr)
