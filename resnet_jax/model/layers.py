"""The model's two layers: a convolution whose bias a following BatchNorm can fold in, and that BatchNorm.

Variables are named and shaped as Flax's `nn.Conv` / `nn.BatchNorm` name them (params `kernel`,
`bias`, `scale`; batch_stats `mean`, `var`), so checkpoints and parameter counts are those of the
Keras layers.

Why not `nn.Conv` + `nn.BatchNorm`: a conv bias feeding a BatchNorm in training mode cancels
exactly (the batch mean absorbs it), yet adding it costs a full pass over the activations before
the statistics can be taken (about 6 % of the seed step on CPU). Here the conv can hand its bias
to the BatchNorm instead (`conv_norm`): the statistics come from the bias-free output, the
moving mean gets the bias added back, and inference subtracts `mean - bias` (one vector). Outputs
are those of conv -> +bias -> BatchNorm in exact arithmetic; the bias's gradient is exactly zero,
as the math says, where Keras's is float noise that Adam turns into a small random walk.
The protocol is explicit: `conv_norm(conv, norm, x)` = `norm(conv(x, add_bias=False),
shift=<conv's bias>)`.

Why BatchNorm's training-mode normalization has its own JVP (`normalize`): a batch-32 step on a GPU
is bound by how many kernels it launches, and XLA:GPU splits every large per-channel sum into two
kernels; autodiff of the plain formula takes the backward pass's sums (of dy and of dy * x) one by
one, and the forward statistics (of x and of x^2) likewise. `normalize` takes each pair as one
stacked reduction, in both directions: the seed step is 265 GPU kernels instead of 330 (jax
0.11.2, `experiments/gpu_kernels/gpu_hlo.py`, docs/performance.md). The outputs are computed as before;
gradients agree with autodiff of the plain formula to float rounding (tests/test_layers.py);
forward mode works.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

he_normal = nn.initializers.he_normal()  # truncated normal, fan_in, scale 2


class Conv(nn.Module):
    """2-D NHWC convolution, 'SAME' padding, kernel HWIO: conv(x) + bias (`add_bias=False`: the
    bias is left for a following `BatchNorm(shift=...)`, see `conv_norm`)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = he_normal

    @nn.compact
    def __call__(self, x, add_bias: bool = True):
        shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(
            jnp.asarray(x, self.dtype),
            jnp.asarray(kernel, self.dtype),
            tuple(self.strides),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + jnp.asarray(bias, self.dtype) if add_bias else y


class BatchNorm(nn.Module):
    """Flax `nn.BatchNorm` over the last axis (fast variance, float32 statistics, output in
    `dtype`), normalizing x + shift where `shift` is a per-channel vector (a conv's folded bias)."""

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, shift=None):
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        shift = jnp.zeros((c,), jnp.float32) if shift is None else jnp.asarray(shift, jnp.float32)
        x32 = jnp.asarray(x, jnp.float32)
        scale32, bias32 = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value - shift, ra_var.value  # of x, not x + shift
            return jnp.asarray(_scale_shift(x32, mean, var, scale32, bias32, self.epsilon), self.dtype)
        y, mean, var = normalize(x32, scale32, bias32, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * (mean + shift)
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return jnp.asarray(y, self.dtype)


def _scale_shift(x, mean, var, scale, bias, eps):
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias


def _channel_means(a, b):
    """The means of a and of b over every axis but the last, as one reduction."""
    return tuple(jnp.mean(jnp.stack([a, b]), tuple(range(1, a.ndim))))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def normalize(x, scale, bias, eps: float):
    """BatchNorm in training mode over the last axis: (y, batch mean, batch variance), where
    y = (x - mean) * rsqrt(var + eps) * scale + bias and var = max(0, mean(x^2) - mean^2)."""
    mean, sq = _channel_means(x, jnp.square(x))
    var = jnp.maximum(0.0, sq - jnp.square(mean))
    return _scale_shift(x, mean, var, scale, bias, eps), mean, var


@normalize.defjvp
def _normalize_jvp(eps, primals, tangents):
    """The derivative of `normalize`, written so that its transpose (reverse mode) takes the two
    per-channel sums it needs, of dy * x and of dy, as one stacked reduction."""
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    out = _, mean, var = normalize(x, scale, bias, eps)
    inv = jax.lax.rsqrt(var + eps)
    mul = inv * scale
    dmean, dsq = _channel_means(dx, 2 * x * dx)
    dvar = jnp.where(var > 0, dsq - 2 * mean * dmean, 0.0)  # max(0, .) passes no change at 0
    dmul = -0.5 * inv * inv * mul * dvar + inv * dscale
    dshift = dbias - dmean * mul - mean * dmul
    # dy = dx * mul + x * dmul + dshift, the two per-channel terms as one stacked product
    per_channel = jnp.stack([dmul, dshift]).reshape((2,) + (1,) * (x.ndim - 1) + (-1,))
    dy = dx * mul + jnp.sum(jnp.stack([x, jnp.ones_like(x)]) * per_channel, 0)
    return out, (dy, dmean, dvar)


def conv_norm(conv: Conv, norm: BatchNorm, x):
    """norm(conv(x) + bias) with the conv's bias handed to the norm: exact, one pass fewer."""
    y = conv(x, add_bias=False)
    return norm(y, shift=conv.get_variable("params", "bias"))
