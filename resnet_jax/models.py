"""ResNet v1 of the seed run (Keras `cifar10_resnet.py`, stages 3, 3, 2) as a Flax linen Module."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.layers import BatchNorm, Conv, he_normal


def materialize(x):
    """x, unchanged, computed once into memory instead of fused into each consumer.

    XLA:CPU fuses cheap elementwise chains into every consumer and recomputes them there; on the
    residual stream that means the whole BatchNorm/ReLU/add chain of several blocks is recomputed
    inside each convolution-gradient transpose (about 20 % of the seed step). XLA never duplicates a
    division, and `lax.optimization_barrier` does not survive XLA:CPU's pipeline, so divide by
    ones that XLA cannot fold (`x * 0 + 1` is not constant under IEEE rules; a scalar divisor
    would be turned into a multiplication). x / 1 == x exactly, element by element (subnormals
    excepted: XLA:CPU flushes them to zero in any arithmetic, a multiplication by one included).
    """
    return _divide_by_ones(x)


@jax.custom_vjp
def _divide_by_ones(x):
    return x / (jax.lax.stop_gradient(x) * 0 + 1)


def _fwd(x):
    return _divide_by_ones(x), None


def _bwd(_, g):
    return (g,)  # the identity's gradient, without a division of its own


_divide_by_ones.defvjp(_fwd, _bwd)


class Block(nn.Module):
    """y = bn(conv(relu(bn(conv(x, s))))); x = conv1x1(x, s) when s > 1; out = relu(x + y).

    The 3x3 convs hand their biases to the BatchNorm that follows (see `layers`)."""

    filters: int
    strides: int
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), fold_bias=True, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(*y))
        y = self.conv(self.filters, (3, 3), fold_bias=True, name="conv2")(y)
        y = self.norm(name="bn2")(*y)
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = self.conv(self.filters, (1, 1), (self.strides, self.strides), name="proj")(x)
        return materialize(nn.relu(x + y))


class ResNet(nn.Module):
    """`__call__(x, train) -> float32 logits`. Variables: {'params', 'batch_stats'}.

    Any HxWxC input works: the head pools globally. `dtype` is the compute dtype; parameters and
    batch statistics are float32.
    """

    stage_sizes: Sequence[int] = (3, 3, 2)
    num_filters: int = 32
    num_classes: int = 10
    dtype: Any = jnp.float32
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(Conv, dtype=self.dtype, param_dtype=jnp.float32)
        norm = functools.partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=jnp.float32)
        x = jnp.asarray(x, self.dtype)
        x = conv(self.num_filters, (3, 3), fold_bias=True, name="conv_init")(x)
        x = materialize(nn.relu(norm(name="bn_init")(*x)))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = Block(self.num_filters * 2**i, strides, conv, norm, name=f"stage{i + 1}_block{j + 1}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, kernel_init=he_normal, dtype=self.dtype,
                     param_dtype=jnp.float32, name="head")(x)
        return jnp.asarray(x, jnp.float32)


def from_config(config) -> ResNet:
    return ResNet(stage_sizes=tuple(config.stage_sizes), num_filters=config.num_filters,
                  num_classes=config.num_classes, dtype=jnp.dtype(config.dtype),
                  bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon)


def conv_layers(config, image_shape=(32, 32, 3)):
    """(input height, input width, in channels, out channels, kernel, stride) of every conv, in order.

    Read from the architecture alone (no JAX), so it can size a run before JAX starts.
    """
    h, w, c = (int(d) for d in image_shape)
    layers = [(h, w, c, config.num_filters, 3, 1)]  # stem
    c = config.num_filters
    for i, blocks in enumerate(config.stage_sizes):
        f = config.num_filters * 2**i
        for j in range(blocks):
            s = 2 if i > 0 and j == 0 else 1
            layers.append((h, w, c, f, 3, s))
            if s != 1 or c != f:
                layers.append((h, w, c, f, 1, s))  # 1x1 shortcut
            h, w = -(-h // s), -(-w // s)
            layers.append((h, w, f, f, 3, 1))
            c = f
    return layers


def forward_flops(config, image_shape=(32, 32, 3)) -> float:
    """2 x multiply-adds of one image's forward pass through every conv and the dense layer."""
    macs = sum(-(-h // s) * -(-w // s) * k * k * cin * cout
               for h, w, cin, cout, k, s in conv_layers(config, image_shape))
    top = config.num_filters * 2 ** (len(config.stage_sizes) - 1)
    return 2.0 * (macs + top * config.num_classes)
