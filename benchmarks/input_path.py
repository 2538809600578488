"""Cost of the on-device input path (issue 3): images/s of the input path alone, of input path +
train step (what training runs), and of the bare jitted train step on pre-placed batches.

    python benchmarks/input_path.py [--steps 30] [--num_filters 32] [--stage_sizes 3,3,2]

Prints one JSON line. overhead_pct = how much slower input+step is than the bare step.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

import resnet_jax as rj
from common import add_model_args, setup
from resnet_jax import pipeline
from resnet_jax.hugepages import reexec_with_huge_pages


def timed(fn, steps):
    jax.block_until_ready(fn())  # compile + warm up, finished before the clock starts
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num_train", type=int, default=50_000)
    add_model_args(p, cpu_devices="1")  # 1: the step alone, as the bare step runs it
    a = p.parse_args()
    config, mesh, data, state, key, perm = setup(a, a.num_train, 100, steps_per_call=a.steps)
    B, n = a.batch_size, a.steps

    @jax.jit
    def input_only(data, perm, i, key):
        idx = jax.lax.dynamic_slice_in_dim(perm, i * B, B)
        x = pipeline.preprocess(data.train_images[idx], data.pixel_mean)
        return rj.augment(jax.random.fold_in(key, i), x, config), data.train_labels[idx]

    def run_input():
        return [input_only(data, perm, i, key) for i in range(n)]

    chunk = pipeline.make_train_chunk(mesh, config.device_loop)
    holder = {"s": state}

    def run_chunk():
        holder["s"], m = chunk(holder["s"], data, perm, 0, 0, key, length=n, batch=B)
        return m

    batches = [jax.device_put(input_only(data, perm, i, key)) for i in range(n)]
    step = jax.jit(rj.train_step, donate_argnums=0)
    holder2 = {"s": jax.tree.map(jnp.copy, state)}

    def run_bare():
        ms = []
        for x, y in batches:
            holder2["s"], m = step(holder2["s"], x, y)
            ms.append(m)
        return ms

    t_in, t_chunk, t_bare = timed(run_input, n), timed(run_chunk, n), timed(run_bare, n)
    ips = lambda t: n * B / t
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "devices": mesh.size, "batch_size": B,
        "model": f"{a.num_filters}x{a.stage_sizes}", "device_loop": config.device_loop,
        "input_only_images_per_s": round(ips(t_in), 1),
        "input_plus_step_images_per_s": round(ips(t_chunk), 1),
        "bare_step_images_per_s": round(ips(t_bare), 1),
        "overhead_pct": round(100 * (t_chunk / t_bare - 1), 2)}))


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py: huge-page malloc (resnet_jax/hugepages.py)
    main()
