"""Forward + backward time of one convolution layer in two forms, per layer shape of a model.

    python benchmarks/conv_forms.py [--num_filters 4] [--stage_sizes 1,1,1] [--batch_size 32]

`lax`: jax.lax.conv_general_dilated on NHWC (what resnet_jax uses). `elementwise`: activations
channel-major (C, H, W, N) and the convolution written as sums of (scalar weight x shifted plane),
which XLA fuses into one loop; a custom VJP computes the input gradient the same way (flipped
kernel) and the kernel gradient as one matmul over the stacked taps. Prints one JSON line per
layer shape with both times and the largest relative difference of the results.

Finding (2 cores, batch 32, README "Speed"): the elementwise form is 2.5-3.5x faster for the
4-channel 32x32 layers of the tiny model, slower from 16 channels on, and a whole tiny step built
on it was 1.6x faster, but deeper models got slower than with lax convolutions: XLA:CPU then fuses
the BatchNorm/residual chains into the many tap reads and recomputes them (it drops optimization
barriers on CPU, so they cannot be stopped). So resnet_jax keeps lax convolutions.
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax import lax

from common import timed
from resnet_jax.config import Config
from resnet_jax.models import conv_layers
from resnet_jax.hugepages import reexec_with_huge_pages


def same_pads(n, k, s):
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return out, total // 2, total - total // 2


def taps(xp, k, s, ho, wo):
    c, _, _, n = xp.shape
    return [lax.slice(xp, (0, dy, dx, 0), (c, dy + s * (ho - 1) + 1, dx + s * (wo - 1) + 1, n), (1, s, s, 1))
            for dy in range(k) for dx in range(k)]


def pad(x, k, s):
    _, h, w, _ = x.shape
    ho, plo, phi = same_pads(h, k, s)
    wo, qlo, qhi = same_pads(w, k, s)
    return jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0))), ho, wo, plo, qlo


def valid_sum(xp, w, s, ho, wo):
    """out[o] = sum over taps j and input channels i of w[j, i, o] * tap_j[i] (VALID on padded xp)."""
    k, cin = w.shape[0], xp.shape[0]
    t = taps(xp, k, s, ho, wo)
    outs = []
    for o in range(w.shape[-1]):
        terms = [w[j // k, j % k, i, o] * t[j][i] for j in range(k * k) for i in range(cin)]
        outs.append(functools.reduce(jnp.add, terms))
    return jnp.stack(outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_elementwise(x, w, s):
    xp, ho, wo, _, _ = pad(x, w.shape[0], s)
    return valid_sum(xp, w, s, ho, wo)


def _fwd(x, w, s):
    return conv_elementwise(x, w, s), (x, w)


def _bwd(s, res, g):
    x, w = res
    k = w.shape[0]
    _, h, wd, _ = x.shape
    xp, ho, wo, plo, qlo = pad(x, k, s)
    lo_h, lo_w = k - 1 - plo, k - 1 - qlo  # input gradient: stride-1 conv of the dilated g
    gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (lo_h, h + k - 1 - lo_h - (s * (ho - 1) + 1), s - 1),
                                            (lo_w, wd + k - 1 - lo_w - (s * (wo - 1) + 1), s - 1), (0, 0, 0)))
    dx = valid_sum(gp, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), 1, h, wd)
    stacked = jnp.stack(taps(xp, k, s, ho, wo)).reshape(k * k * x.shape[0], -1)
    return dx, (stacked @ g.reshape(g.shape[0], -1).T).reshape(w.shape)


conv_elementwise.defvjp(_fwd, _bwd)


def conv_lax(x, w, s):
    return lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num_filters", type=int, default=4)
    p.add_argument("--stage_sizes", default="1,1,1")
    p.add_argument("--batch_size", type=int, default=32)
    a = p.parse_args()
    config = Config(num_filters=a.num_filters, stage_sizes=tuple(int(v) for v in a.stage_sizes.split(",")))
    for size, _, cin, cout, k, s in dict.fromkeys(conv_layers(config)):  # each distinct shape once
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (a.batch_size, size, size, cin))
        w = jax.random.normal(keys[1], (k, k, cin, cout)) * 0.1
        y, vjp = jax.vjp(lambda x, w: conv_lax(x, w, s), x, w)
        g = jax.random.normal(keys[2], y.shape)
        chwn = (3, 1, 2, 0)  # NHWC <-> CHWN (self-inverse)
        xc, gc = jnp.transpose(x, chwn), jnp.transpose(g, chwn)
        yc, vjp_c = jax.vjp(lambda x, w: conv_elementwise(x, w, s), xc, w)
        pairs = [(jnp.transpose(yc, chwn), y), *zip((jnp.transpose(vjp_c(gc)[0], chwn), vjp_c(gc)[1]), vjp(g))]
        diff = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in pairs)

        def both(conv, x, w, g):
            out, back = jax.vjp(lambda x, w: conv(x, w, s), x, w)
            return out, back(g)

        print(json.dumps({"layer": f"{cin}->{cout} {size}x{size} stride {s} kernel {k}",
                          "lax_ms": round(timed(lambda x, w, g: both(conv_lax, x, w, g), x, w, g), 3),
                          "elementwise_ms": round(timed(lambda x, w, g: both(conv_elementwise, x, w, g), xc, w, gc), 3),
                          "max_rel_diff": float(f"{diff:.1e}")}))


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py: huge-page malloc (resnet_jax/hugepages.py)
    main()
