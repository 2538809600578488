"""The ResNets of Keras's `cifar10_resnet.py` as one Flax linen Module: v1 (the seed run's, basic
blocks, post-activation) and v2 (pre-activation bottleneck blocks)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.model.layers import BatchNorm, Conv, conv_norm, he_normal
from resnet_jax.model.memo import per_process


def materialize(x):
    """x, unchanged, computed once into memory instead of fused into each consumer (a CPU setting:
    `ResNet.materialize`, switched on by resnet_jax.tuning on CPUs only).

    XLA:CPU fuses cheap elementwise chains into every consumer and recomputes them there; on the
    residual stream that means the whole BatchNorm/ReLU/add chain of several blocks is recomputed
    inside each convolution-gradient transpose (about 20 % of the seed step). XLA never duplicates a
    division, and `lax.optimization_barrier` does not survive XLA:CPU's pipeline, so divide by
    ones that XLA cannot fold: `x * 0 + 1` where x is finite (not constant under IEEE rules; a
    scalar divisor would be turned into a multiplication), 1 where it is inf or NaN. So
    x / divisor == x exactly, element by element, inf and NaN included (subnormals excepted:
    XLA:CPU flushes them to zero in any arithmetic, a multiplication by one included).
    """
    return _divide_by_ones(x)


@jax.custom_vjp
def _divide_by_ones(x):
    x0 = jax.lax.stop_gradient(x)
    return x / jnp.where(jnp.isfinite(x0), x0 * 0 + 1, jnp.ones_like(x0))


def _fwd(x):
    return _divide_by_ones(x), None


def _bwd(_, g):
    return (g,)  # the identity's gradient, without a division of its own


_divide_by_ones.defvjp(_fwd, _bwd)


class Residual(nn.Module):
    """What both block types share: how their convs and norms are made, and `materialize`."""

    conv: Any
    norm: Any
    materialize: bool

    def finish(self, out):
        return materialize(out) if self.materialize else out


class Block(Residual):
    """v1: y = bn(conv(relu(bn(conv(x, s))))); x = conv1x1(x, s) when s > 1; out = relu(x + y).

    The 3x3 convs hand their biases to the BatchNorm that follows (`layers.conv_norm`)."""

    filters: int
    strides: int

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = conv_norm(self.conv(self.filters, (3, 3), s, name="conv1"), self.norm(name="bn1"), x)
        y = conv_norm(self.conv(self.filters, (3, 3), name="conv2"), self.norm(name="bn2"), nn.relu(y))
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = self.conv(self.filters, (1, 1), s, name="proj")(x)
        return self.finish(nn.relu(x + y))


class Bottleneck(Residual):
    """v2's pre-activation bottleneck, as the Keras example builds it:
    y = conv1x1(relu(bn(x)), s) -> conv3x3(relu(bn(.))) -> conv1x1(relu(bn(.)), out); in the
    first block of a stage x = conv1x1(x, s) (no BN), else x is the identity; out = x + y.
    The first block of the first stage has no BN-ReLU before its first conv (its input was just
    normalized by the stem). Convs followed by a BatchNorm hand it their bias (`conv_norm`)."""

    width: int
    out: int
    strides: int
    first: bool  # first block of its stage: a projection shortcut
    preact: bool  # BN-ReLU before the first conv

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = nn.relu(self.norm(name="bn1")(x)) if self.preact else x
        y = conv_norm(self.conv(self.width, (1, 1), s, name="conv1"), self.norm(name="bn2"), y)
        y = conv_norm(self.conv(self.width, (3, 3), name="conv2"), self.norm(name="bn3"), nn.relu(y))
        y = self.conv(self.out, (1, 1), name="conv3")(nn.relu(y))
        if self.first:
            x = self.conv(self.out, (1, 1), s, name="proj")(x)
        return self.finish(x + y)


class ResNet(nn.Module):
    """`__call__(x, train) -> float32 logits`. Variables: {'params', 'batch_stats'}.

    version 1: the seed's ResNet (basic blocks; stage i has num_filters * 2**i channels).
    version 2: pre-activation bottlenecks (stage widths num_filters, 4x then 2x the previous
    stage's output as their outputs), a final BN-ReLU before the pool.
    Any HxWxC input works: the head pools globally. `dtype` is the compute dtype; parameters and
    batch statistics are float32. `materialize` is a CPU speed setting (see `materialize`); it
    changes no value.
    """

    stage_sizes: Sequence[int] = (3, 3, 2)
    num_filters: int = 32
    num_classes: int = 10
    dtype: Any = jnp.float32
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    materialize: bool = False
    version: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(Conv, dtype=self.dtype, param_dtype=jnp.float32)
        norm = functools.partial(
            BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(conv_norm(conv(self.num_filters, (3, 3), name="conv_init"), norm(name="bn_init"), x))
        x = materialize(x) if self.materialize else x
        width = self.num_filters
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                name = f"stage{i + 1}_block{j + 1}"
                shared = dict(conv=conv, norm=norm, materialize=self.materialize, strides=strides, name=name)
                if self.version == 1:
                    x = Block(filters=self.num_filters * 2**i, **shared)(x)
                else:
                    out = width * (4 if i == 0 else 2)
                    x = Bottleneck(width=width, out=out, first=j == 0, preact=i > 0 or j > 0, **shared)(x)
            if self.version == 2:
                width = width * (4 if i == 0 else 2)
        if self.version == 2:
            x = nn.relu(norm(name="bn_final")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes, kernel_init=he_normal, dtype=self.dtype, param_dtype=jnp.float32, name="head"
        )(x)
        return jnp.asarray(x, jnp.float32)


def from_config(config, materialize: bool = False) -> ResNet:
    """The Config's ResNet. The same settings give the same Module object within a process, so a
    second run of them finds its compiled steps (a step's static arguments include the model's
    `apply`, which compares by the Module's identity)."""
    return _resnet(
        tuple(config.stage_sizes),
        config.num_filters,
        config.num_classes,
        jnp.dtype(config.dtype),
        config.bn_momentum,
        config.bn_epsilon,
        materialize,
        config.resnet_version,
    )


@functools.lru_cache(maxsize=32)
def _resnet(stage_sizes, num_filters, num_classes, dtype, bn_momentum, bn_epsilon, materialize, version):
    return ResNet(
        stage_sizes=stage_sizes,
        num_filters=num_filters,
        num_classes=num_classes,
        dtype=dtype,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        materialize=materialize,
        version=version,
    )


def name(config) -> str:
    """The Keras example's name for a config's model (ResNet20v1, ResNet56v2, ...), else a description."""
    n = config.stage_sizes[0]
    if len(config.stage_sizes) == 3 and set(config.stage_sizes) == {n} and config.num_filters == 16:
        return f"ResNet{(6 if config.resnet_version == 1 else 9) * n + 2}v{config.resnet_version}"
    blocks = ",".join(map(str, config.stage_sizes))
    return f"ResNet v{config.resnet_version}, {config.num_filters} filters, blocks {blocks}"


def forward_flops(config, image_shape=(32, 32, 3), model=None) -> float:
    """2 x multiply-adds of one image's forward pass through every conv and dense layer.

    Read off the model itself (`model`, else the Config's): its forward pass traced abstractly (no
    JAX backend is started, so this can size a run before JAX starts), summing each convolution's
    and matrix product's multiply-adds from their shapes.
    """
    model = from_config(config) if model is None else model
    return _traced_flops(model, tuple(int(d) for d in image_shape))


def step_flops(config, image_shape=(32, 32, 3), model=None) -> float:
    """The forward FLOPs of a training step: the batch times one image's (your model's, else the
    Config's), what sizes a run's CPU devices (resnet_jax.tuning.run_devices)."""
    return config.batch_size * forward_flops(config, image_shape, model=model)


@per_process(maxsize=32)
def abstract_variables(model, image_shape: tuple):
    """A model's variables, abstract (jax.eval_shape of its init on a batch of 2): traced once per
    model and image shape in a process, for the FLOP count, the run's parts and the check of a
    model you bring."""
    x = jax.ShapeDtypeStruct((2,) + image_shape, jnp.float32)
    return jax.eval_shape(
        lambda k, x: model.init({"params": k, "dropout": k}, x, train=False),
        jax.eval_shape(lambda: jax.random.key(0)),
        x,
    )


@per_process(maxsize=32)
def _traced_flops(model, image_shape: tuple) -> float:
    """forward_flops of one model and image shape, traced once in a process (train.py and a
    notebook's run ask for it several times: the CPU split, the advice, the start lines)."""
    x = jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
    variables = abstract_variables(model, image_shape)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return float(_jaxpr_flops(jaxpr.jaxpr))


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            per_output = math.prod(rhs.shape) // rhs.shape[out_feature_dim]
            total += 2 * math.prod(out.shape) * per_output
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
            total += 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
        for param in eqn.params.values():  # nested jaxprs (custom_vjp, pjit, ...)
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                total += _jaxpr_flops(inner)
    return total
