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
"""

from __future__ import annotations

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
        if self.use_running_average:
            mean, var = ra_mean.value - shift, ra_var.value  # of x, not x + shift
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), axes) - jnp.square(mean))
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * (mean + shift)
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        mul = jax.lax.rsqrt(var + self.epsilon) * jnp.asarray(scale, jnp.float32)
        y = (x32 - mean) * mul + jnp.asarray(bias, jnp.float32)
        return jnp.asarray(y, self.dtype)


def conv_norm(conv: Conv, norm: BatchNorm, x):
    """norm(conv(x) + bias) with the conv's bias handed to the norm: exact, one pass fewer."""
    y = conv(x, add_bias=False)
    return norm(y, shift=conv.get_variable("params", "bias"))
