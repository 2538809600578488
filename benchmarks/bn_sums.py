"""The two BatchNorm statistics (sum and sum of squares over N, H, W) in five forms, timed alone.

    python benchmarks/bn_sums.py [--calls 200]

Asks whether a one-pass BatchNorm would pay on XLA:CPU: prints one JSON line per activation
shape (a seed-model layer on one of 2 devices, and a tiny-model layer) with microseconds per call
of each form and its largest relative difference from the plain form.
"""

import argparse
import json
import jax
import jax.numpy as jnp
from jax import lax

from common import timed
from resnet_jax.hugepages import reexec_with_huge_pages

AXES = (0, 1, 2)


def plain(x):  # what layers.BatchNorm does (it takes their means): two separate reductions
    return jnp.sum(x, AXES), jnp.sum(x * x, AXES)


def variadic(x):  # one reduce over (x, x*x): a single pass in principle
    zero = jnp.float32(0)
    return lax.reduce((x, x * x), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), AXES)


def rows(x):  # the same sums over a (N*H*W, C) view
    y = x.reshape(-1, x.shape[-1])
    return jnp.sum(y, 0), jnp.sum(y * y, 0)


def stacked(x):  # one reduction of [x, x*x] side by side
    c = x.shape[-1]
    y = x.reshape(-1, c)
    s = jnp.sum(jnp.concatenate([y, y * y], 1), 0)
    return s[:c], s[c:]


def dots(x):  # sums as vector-matrix products
    y = x.reshape(-1, x.shape[-1])
    ones = jnp.ones((y.shape[0],), x.dtype)
    return ones @ y, ones @ (y * y)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()
    for shape in [(16, 32, 32, 32), (16, 16, 16, 64), (32, 32, 32, 4)]:
        x = jax.random.normal(jax.random.key(0), shape)
        ref = plain(x)
        row = {"shape": shape}
        for f in (plain, variadic, rows, stacked, dots):
            out = jax.jit(f)(x)
            diff = max(float(jnp.max(jnp.abs(o - r) / (jnp.abs(r) + 1))) for o, r in zip(out, ref))
            row[f.__name__] = {"us": round(timed(f, x, n=a.calls) * 1e3, 1),
                               "max_rel_diff": float(f"{diff:.1e}")}
        print(json.dumps(row))


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py: huge-page malloc (resnet_jax/hugepages.py)
    main()
