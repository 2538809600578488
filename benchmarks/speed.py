"""Training and evaluation speed of resnet_jax on this machine's devices, optionally side by side
with the Keras original (benchmarks/keras_baseline.py) in the same run.

    python benchmarks/speed.py [--batch_size 32] [--num_filters 32] [--stage_sizes 3,3,2]
                               [--dtype float32] [--steps 40] [--repeats 3] [--keras]

Prints one JSON line: train_images_per_s (on-device input path + train step, steady state: the
fastest of --repeats windows of --steps steps after a warm-up; Keras is timed the same way),
eval_images_per_s, compile_s, tflops (achieved, from an analytic FLOP count: 2 x MACs of every conv
and the dense layer, x3 for forward + backward), device kind and count; with --keras also the
Keras figure and the ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax

import resnet_jax as rj
from common import add_model_args, setup
from resnet_jax import pipeline
from resnet_jax.hugepages import environ_before_restart, reexec_with_huge_pages


def main():
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=40, help="train steps per timed window (after a warm-up call)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the fastest is reported (Keras too)")
    p.add_argument("--device_loop", default="auto")
    p.add_argument("--keras", action="store_true", help="also run benchmarks/keras_baseline.py")
    a = p.parse_args()
    n_train, n_test = 50_000, 10_000
    if (a.repeats + 1) * a.steps * a.batch_size > n_train:
        p.error(f"(repeats + 1) x steps x batch_size must fit in one epoch of {n_train} images")
    config, mesh, data, state, key, perm = setup(a, n_train, n_test, dtype=a.dtype,
                                                 steps_per_call=a.steps, device_loop=a.device_loop)
    chunk = pipeline.make_train_chunk(mesh, config.device_loop)
    evaluate = pipeline.make_evaluate(config, mesh)

    start = time.perf_counter()
    state, m = chunk(state, data, perm, 0, 0, key, length=a.steps, batch=a.batch_size)
    jax.block_until_ready(m)
    first_call = time.perf_counter() - start
    train_times = []
    for r in range(1, a.repeats + 1):  # the best of several windows, as for Keras
        start = time.perf_counter()
        state, m = chunk(state, data, perm, r * a.steps * a.batch_size, r * a.steps, key,
                         length=a.steps, batch=a.batch_size)
        jax.block_until_ready(m)
        train_times.append(time.perf_counter() - start)
    train_s = min(train_times)
    compile_s = max(first_call - train_s, 0.0)
    jax.block_until_ready(evaluate(state, data))
    eval_times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        jax.block_until_ready(evaluate(state, data))
        eval_times.append(time.perf_counter() - start)
    eval_s = min(eval_times)

    images_per_s = a.steps * a.batch_size / train_s
    flops = 3 * rj.models.forward_flops(config, (32, 32, 3))
    result = {
        "device": jax.devices()[0].device_kind, "devices": mesh.size, "batch_size": a.batch_size,
        "model": f"{a.num_filters}x{a.stage_sizes}", "dtype": a.dtype,
        "device_loop": config.device_loop, "train_images_per_s": round(images_per_s, 1),
        "eval_images_per_s": round(n_test / eval_s, 1), "compile_s": round(compile_s, 2),
        "tflops": round(flops * images_per_s / 1e12, 4),
        "epoch_s_at_this_speed": round(n_train / images_per_s, 1),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    if a.keras:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run([sys.executable, os.path.join(here, "keras_baseline.py"),
                              "--batch_size", str(a.batch_size), "--num_filters", str(a.num_filters),
                              "--stage_sizes", a.stage_sizes, "--steps", str(a.steps),
                              "--repeats", str(a.repeats)], capture_output=True, text=True,
                             env=environ_before_restart())  # Keras as users run it
        if out.returncode != 0:
            sys.exit(f"keras baseline failed: {out.stderr.strip().splitlines()[-1:]}")
        keras = json.loads(out.stdout.strip().splitlines()[-1])
        result["keras_train_images_per_s"] = keras["train_images_per_s"]
        result["keras"] = keras["framework"]
        result["keras_glibc_tunables"] = environ_before_restart().get("GLIBC_TUNABLES", "")
        result["speedup_vs_keras"] = round(images_per_s / keras["train_images_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py: huge-page malloc (resnet_jax/hugepages.py)
    main()
