"""Training and evaluation speed of resnet_jax on this machine's devices, optionally side by side
with the Keras original (benchmarks/keras_baseline.py) in the same run.

    python benchmarks/speed.py [--batch_size 32[,128,...]] [--dtype float32[,bfloat16]]
                               [--num_filters 32] [--stage_sizes 3,3,2] [--steps 200]
                               [--steps_per_call N] [--repeats 3] [--keras] [--out FILE]

For every batch size x dtype (one process, one compile each) prints one JSON line:
train_images_per_s (the on-device input path + train step as the training loop runs it: device
calls of --steps_per_call steps, metrics fetched after each call; the fastest of --repeats windows
of about --steps steps after a warm-up call; Keras is timed the same way), epoch_s (one epoch of
50,000 images at that speed), eval_images_per_s, compile_s (first call minus a timed one), tflops
(achieved, from an analytic FLOP count: 2 x MACs of every conv and the dense layer, x3 for forward
+ backward), device kind and count; with --keras also the Keras figure and the ratio. --out
appends the lines to a file too (benchmarks/gpu.sh writes benchmarks/results/gpu.jsonl so).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
from common import add_model_args, configure_devices, model_config, random_cifar, setup
from jsonl import emit

import resnet_jax as rj
from resnet_jax import pipeline, tuning
from resnet_jax.hugepages import environ_before_restart

N_TRAIN, N_TEST = 50_000, 10_000


def measure(a, batch_size, dtype, dataset):
    config, mesh, data, state, key, perm = setup(
        a,
        dataset,
        batch_size=batch_size,
        dtype=dtype,
        device_loop=a.device_loop,
        **({"steps_per_call": a.steps_per_call} if a.steps_per_call else {}),
    )
    k = min(config.steps_per_call, N_TRAIN // batch_size)  # a call never spans epochs
    calls = max(1, round(a.steps / k))
    chunk = pipeline.make_train_chunk(mesh, config.device_loop)
    evaluate = pipeline.make_evaluate(config, mesh)

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
    for r in range(1, a.repeats + 1):  # the best of several windows, as for Keras
        start = time.perf_counter()
        window(r * calls * k)
        times.append(time.perf_counter() - start)
    train_s = min(times)
    jax.block_until_ready(evaluate(state, data))
    eval_times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        jax.block_until_ready(evaluate(state, data))
        eval_times.append(time.perf_counter() - start)

    images_per_s = calls * k * batch_size / train_s
    flops = 3 * rj.models.forward_flops(config, (32, 32, 3))
    return {
        "what": a.what,
        "device_kind": jax.devices()[0].device_kind,
        "devices": mesh.size,
        "batch_size": batch_size,
        "dtype": dtype,
        "model": rj.models.name(config),
        "device_loop": pipeline.resolve_loop(mesh, config.device_loop),
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
    }


def keras(a, batch_size, images_per_s):
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(here, "keras_baseline.py"),
            "--batch_size",
            str(batch_size),
            "--num_filters",
            str(a.num_filters),
            "--stage_sizes",
            a.stage_sizes,
            "--steps",
            str(a.steps),
            "--repeats",
            str(a.repeats),
        ],
        capture_output=True,
        text=True,
        env=environ_before_restart(),
    )  # Keras as users run it
    if out.returncode != 0:
        sys.exit(f"keras baseline failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "keras_train_images_per_s": result["train_images_per_s"],
        "keras": result["framework"],
        "keras_glibc_tunables": environ_before_restart().get("GLIBC_TUNABLES", ""),
        "speedup_vs_keras": round(images_per_s / result["train_images_per_s"], 2),
    }


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    add_model_args(p)
    batch = next(x for x in p._actions if x.dest == "batch_size")
    batch.type, batch.default, batch.help = str, "32", "comma-separated: 32,128,512"
    p.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    p.add_argument("--steps", type=int, default=200, help="train steps per timed window")
    p.add_argument(
        "--steps_per_call", type=int, default=0, help="train steps per device call (default: the Config's)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed windows; the fastest is reported (Keras too)"
    )
    p.add_argument("--device_loop", default="auto")
    p.add_argument("--keras", action="store_true", help="also run benchmarks/keras_baseline.py")
    p.add_argument("--what", default="seed_epoch", help="the `what` field of each JSON line")
    p.add_argument("--tag", default="", help="a label for this run's settings (e.g. its XLA flags)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    a = p.parse_args()
    batch_sizes = [int(b) for b in str(a.batch_size).split(",")]
    dtypes = a.dtype.split(",")
    configure_devices(a, model_config(a, batch_size=batch_sizes[0]))
    dataset = random_cifar(N_TRAIN, N_TEST)
    for batch_size in batch_sizes:
        for dtype in dtypes:
            result = measure(a, batch_size, dtype, dataset)
            if a.keras:
                result.update(keras(a, batch_size, result["train_images_per_s"]))
            emit(result, a.out)


if __name__ == "__main__":
    tuning.restart_for_cpu_training()  # as train.py: huge-page malloc on CPUs
    main()
