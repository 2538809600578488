"""Training and evaluation speed of resnet_jax on this machine's devices, optionally side by side
with the Keras original (benchmarks/keras_baseline.py, both Keras 3 backends) in the same run.

    python benchmarks/speed.py [--batch_size 32[,128,...]] [--dtype float32[,bfloat16]]
                               [--num_filters 32] [--stage_sizes 3,3,2] [--steps 200]
                               [--steps_per_call N] [--repeats 3] [--keras] [--out FILE]
                               [--process cli|notebook|plain]

--process says how this process is set up before JAX starts: `cli` as train.py (rj.configure:
CPU devices, malloc, compilation cache), `notebook` as a notebook that calls train_and_evaluate
(its first act, process.setup, sets malloc up; the CPU device count set by hand, as a user
would with jax_num_cpu_devices), `plain` the same without the malloc settings
(RESNET_JAX_MALLOC=0). Each line also gives the kernel CPU time of the timed windows and the peak
resident memory of the process.

For every batch size x dtype (one process, one compile each) prints one JSON line:
train_images_per_s (the on-device input path + train step as the training loop runs it: device
calls of --steps_per_call steps, metrics fetched after each call; the fastest of --repeats windows
of about --steps steps after a warm-up call; Keras is timed the same way), epoch_s (one epoch of
50,000 images at that speed), eval_images_per_s, compile_s (first call minus a timed one), tflops
(achieved, from an analytic FLOP count: 2 x MACs of every conv and the dense layer, x3 for forward
+ backward), device kind and count; with --keras also the Keras figure and the ratio. --out
appends the lines to a file too (benchmarks/gpu.sh writes benchmarks/results/gpu.jsonl so).
"""

import json
import os
import resource
import subprocess
import sys
import time

import jax
from common import configure_devices, emit, model_config, parse, parser, random_cifar, setup

import resnet_jax as rj
from resnet_jax import process, tuning
from resnet_jax.device import programs

N_TRAIN, N_TEST = 50_000, 10_000


def measure(a, batch_size, dtype, dataset):
    config, mesh, data, state, key, perm = setup(a, dataset, batch_size=batch_size, dtype=dtype)
    k = min(config.steps_per_call, N_TRAIN // batch_size)  # a call never spans epochs
    calls = max(1, round(a.steps / k))
    loop = process.current().loop(config.device_loop)
    chunk = programs.TrainCall(mesh, loop)
    evaluate = programs.make_evaluate(config, mesh)

    def window(step0):
        nonlocal state
        for c in range(calls):  # as the training loop does: a call, then its metrics to the host
            s = (step0 + c * k) % (N_TRAIN // batch_size - k + 1)
            state, m = chunk(state, data, perm, s * batch_size, s, key, length=k, batch=batch_size)
            jax.device_get(m)

    start = time.perf_counter()
    window(0)
    first = time.perf_counter() - start
    times = []
    kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for r in range(1, a.repeats + 1):  # the best of several windows, as for Keras
        start = time.perf_counter()
        window(r * calls * k)
        times.append(time.perf_counter() - start)
    kernel = (resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel) / (a.repeats * calls * k)
    train_s = min(times)
    jax.block_until_ready(evaluate(state, data))
    eval_times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        jax.block_until_ready(evaluate(state, data))
        eval_times.append(time.perf_counter() - start)

    images_per_s = calls * k * batch_size / train_s
    flops = 3 * rj.model.resnet.forward_flops(config, (32, 32, 3))
    return {
        "what": a.what,
        "device_kind": jax.devices()[0].device_kind,
        "devices": mesh.size,
        "batch_size": batch_size,
        "dtype": dtype,
        "model": rj.model.resnet.name(config),
        "device_loop": loop,
        "steps_per_call": k,
        "train_images_per_s": round(images_per_s, 1),
        "ms_per_step": round(1e3 * batch_size / images_per_s, 4),
        "epoch_s": round(N_TRAIN / images_per_s, 2),
        "eval_images_per_s": round(N_TEST / min(eval_times), 1),
        "compile_s": round(max(first - train_s, 0.0), 2),
        "tflops": round(flops * images_per_s / 1e12, 4),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "tag": a.tag,
        "batchnorm_derivative": a.batchnorm_derivative,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "process": a.process,
        "malloc": process.applied().get("malloc"),
        "kernel_ms_per_step": round(1e3 * kernel, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def keras(a, batch_size, images_per_s, backend):
    """Keras 3 `fit` on one backend, in a fresh process set up as users run Keras (no resnet_jax
    settings)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_JAX", "XLA_FLAGS"))}
    env.update(KERAS_BACKEND=backend, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(here, "keras_baseline.py"),
            "--batch_size",
            str(batch_size),
            "--num_filters",
            str(a.num_filters),
            "--stage_sizes",
            ",".join(map(str, a.stage_sizes)),
            "--steps",
            str(a.steps),
            "--repeats",
            str(a.repeats),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        sys.exit(f"keras baseline ({backend}) failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def keras_sides(a, batch_size, images_per_s):
    """Both Keras 3 backends, and the ratio against the faster one."""
    results = {b: keras(a, batch_size, images_per_s, b) for b in a.keras_backends.split(",")}
    fastest = max(results, key=lambda b: results[b]["train_images_per_s"])
    line = {f"keras_{b}_train_images_per_s": r["train_images_per_s"] for b, r in results.items()}
    line.update(
        keras=results[fastest]["framework"],
        keras_train_images_per_s=results[fastest]["train_images_per_s"],
        speedup_vs_keras=round(images_per_s / results[fastest]["train_images_per_s"], 2),
    )
    return line


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch_size", default="32", help="comma-separated: 32,128,512")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    p.add_argument("--steps", type=int, default=200, help="train steps per timed window")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed windows; the fastest is reported (Keras too)"
    )
    p.add_argument("--keras", action="store_true", help="also run benchmarks/keras_baseline.py")
    p.add_argument("--keras_backends", default="tensorflow,jax", help="Keras 3 backends to time")
    p.add_argument("--process", default="cli", choices=("cli", "notebook", "plain"), help="see above")
    p.add_argument("--what", default="seed_epoch", help="the `what` field of each JSON line")
    p.add_argument("--tag", default="", help="a label for this run's settings (e.g. its XLA flags)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    a = parse(p)
    batch_sizes = [int(b) for b in str(a.batch_size).split(",")]
    dtypes = a.dtype.split(",")
    config = model_config(a, batch_size=batch_sizes[0], dtype=dtypes[0])
    if a.process == "cli":
        configure_devices(a, config)  # as train.py: rj.configure before JAX starts
    else:
        if a.process == "plain":
            os.environ[process.MALLOC_ENV] = "0"
        import jax

        cores = tuning.cores()
        n = (
            int(a.cpu_devices)
            if a.cpu_devices != "auto"
            else tuning.decide(
                "cpu",
                cores=cores,
                batch_size=config.batch_size,
                flops_per_step=config.batch_size * rj.model.resnet.forward_flops(config),
            ).cpu_devices
        )
        jax.config.update("jax_num_cpu_devices", n)  # what a notebook user sets by hand
        process.setup()  # train_and_evaluate's first act (the CPU count is set already)
    dataset = random_cifar(N_TRAIN, N_TEST)
    for batch_size in batch_sizes:
        for dtype in dtypes:
            result = measure(a, batch_size, dtype, dataset)
            if a.keras:
                result.update(keras_sides(a, batch_size, result["train_images_per_s"]))
            emit(result, a.out)


if __name__ == "__main__":
    main()
