"""K runs of one recipe in one program, against K runs one after another (issues 30, 31).

    python benchmarks/many_runs.py [--k 1,2,4,8,16] [--modes vmap,unrolled,sequential]
                                   [--steps_per_call 50] [--calls 4] [--out FILE] [train.py flags]

The seed model (or any model the flags say), batch 32, float32, the scanned device loop (calls of
--steps_per_call steps), each run with its own state, data order and augmentation keys:
- vmap: `jax.vmap` of the train call over K stacked states (one program, batched kernels);
- unrolled: K states stepped inside one jitted call (independent kernels a GPU's concurrent
  command-buffer schedule can overlap);
- sequential: the single run's call, K times one after another (what train_many does today).
One JSON line per (K, mode): images_per_s over the K runs, speedup_vs_sequential (same K, same
process), compile_s, device_kind. The fastest of three windows of --calls calls each.
"""

import time

import jax
import jax.numpy as jnp
from common import configure_devices, emit, model_config, parse, parser, random_cifar, setup

from resnet_jax import flags
from resnet_jax.device import batches, programs


def modes(mesh, length, batch, data):
    """{mode: f(states, perms, keys) -> (states, metrics)} for K runs."""
    one_call = lambda s, p, key: programs._train_chunk(
        s, data, p, 0, 0, key, length=length, batch=batch, mesh=mesh
    )
    one = jax.jit(one_call, donate_argnums=0)

    def sequential(states, perms, keys):
        out = [one(s, perms[i], keys[i]) for i, s in enumerate(states)]
        return [s for s, _ in out], [m for _, m in out]

    @jax.jit
    def unrolled(states, perms, keys):
        out = [one_call(s, perms[i], keys[i]) for i, s in enumerate(states)]
        return [s for s, _ in out], [m for _, m in out]

    vmapped = jax.jit(jax.vmap(one_call), donate_argnums=0)
    return {"sequential": sequential, "unrolled": unrolled, "vmap": vmapped}


def main():
    p = parser(__doc__)
    p.add_argument("--k", type=flags.comma_list(int), default=(1, 2, 4, 8, 16))
    p.add_argument("--modes", type=flags.comma_list(str), default=("vmap", "unrolled", "sequential"))
    p.add_argument("--calls", type=int, default=4, help="device calls a timed window")
    p.add_argument("--out", default=None)
    p.set_defaults(steps_per_call=50, device_loop="scan")
    a = parse(p)
    configure_devices(a, model_config(a))
    dataset = random_cifar(5000, 1000)
    config, mesh, data, state, key, perm = setup(a, dataset)
    length, batch = config.steps_per_call, config.batch_size
    base = {}
    for k in a.k:
        keys = [jax.random.fold_in(key, i) for i in range(k)]
        perms = [batches.permutation(kk, len(dataset.train_images)) for kk in keys]
        run = modes(mesh, length, batch, data)
        for mode in sorted(a.modes, key=lambda m: m != "sequential"):  # the baseline first
            states = [jax.tree.map(jnp.copy, state) for _ in range(k)]
            if mode == "vmap":
                states = jax.tree.map(lambda *x: jnp.stack(x), *states)
                perms_in, keys_in = jnp.stack(perms), jnp.stack(keys)
            else:
                perms_in, keys_in = perms, keys
            start = time.perf_counter()
            states, m = run[mode](states, perms_in, keys_in)
            jax.block_until_ready(m)
            first = time.perf_counter() - start
            times = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(a.calls):
                    states, m = run[mode](states, perms_in, keys_in)
                    jax.device_get(m)
                times.append(time.perf_counter() - start)
            best = min(times)
            images_per_s = k * a.calls * length * batch / best
            if mode == "sequential":
                base[k] = images_per_s
            emit(
                {
                    "what": "many_runs",
                    "k": k,
                    "mode": mode,
                    "images_per_s": round(images_per_s, 1),
                    "speedup_vs_sequential": round(images_per_s / base[k], 3) if k in base else None,
                    "compile_s": round(max(first - best / a.calls, 0.0), 2),
                    "device_kind": jax.devices()[0].device_kind,
                    "model": f"{config.num_filters}x{','.join(map(str, config.stage_sizes))}",
                    "batch_size": batch,
                    "steps_per_call": length,
                },
                a.out,
            )


if __name__ == "__main__":
    main()
