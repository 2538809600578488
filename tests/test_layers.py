"""layers.Conv + layers.BatchNorm compute what Flax's nn.Conv -> nn.BatchNorm compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from resnet_jax.model import layers


class Folded(nn.Module):
    train: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return layers.conv_norm(
            layers.Conv(6, (3, 3), (2, 2), dtype=self.dtype, name="conv"),
            layers.BatchNorm(not self.train, dtype=self.dtype, name="bn"),
            x,
        )


class Reference(nn.Module):
    train: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(6, (3, 3), (2, 2), padding="SAME", dtype=self.dtype, name="conv")(x)
        return nn.BatchNorm(not self.train, momentum=0.99, epsilon=1e-3, dtype=self.dtype, name="bn")(y)


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 3)) * 2 + 1
    v = Reference(train=False).init(jax.random.key(1), x)
    # Non-trivial values everywhere, the conv bias included, so folding it is really exercised.
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    v = jax.tree.unflatten(
        tree, [jax.random.uniform(k, a.shape, minval=0.5, maxval=1.5) for k, a in zip(keys, leaves)]
    )
    return x, v


@pytest.mark.slow
def test_same_variables_as_flax(setup):
    x, v = setup
    mine = Folded(train=False).init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, v)


@pytest.mark.parametrize("train", [True, False])
def test_outputs_and_statistics_match_flax(setup, train):
    x, v = setup
    out, new = Folded(train).apply(v, x, mutable=["batch_stats"])
    ref, ref_new = Reference(train).apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), new, ref_new)
    if train:  # the moving mean holds the mean of conv + bias, the bias really counted
        assert not np.allclose(
            new["batch_stats"]["bn"]["mean"], 0.99 * v["batch_stats"]["bn"]["mean"], atol=1e-3
        )


@pytest.mark.slow
def test_folded_bias_gets_exactly_zero_gradient(setup):
    x, v = setup

    def loss(params, model):
        out, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out))

    g = jax.grad(loss)(v["params"], Folded(True))
    ref = jax.grad(loss)(v["params"], Reference(True))
    np.testing.assert_array_equal(g["conv"]["bias"], 0)
    assert np.max(np.abs(ref["conv"]["bias"])) < 1e-4  # analytically zero there too: float noise
    for k in ("kernel",):
        np.testing.assert_allclose(g["conv"][k], ref["conv"][k], rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g["bn"], ref["bn"])


def test_bfloat16_matches_flax_bfloat16(setup):
    x, v = setup
    out = Folded(False, jnp.bfloat16).apply(v, x)
    ref = Reference(False, jnp.bfloat16).apply(v, x)
    assert out.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=0.05, atol=0.05)


def test_unfolded_conv_adds_its_bias(setup):
    x, v = setup
    p = v["params"]["conv"]
    mine = layers.Conv(6, (3, 3), (2, 2)).apply({"params": p}, x)
    ref = nn.Conv(6, (3, 3), (2, 2), padding="SAME").apply({"params": p}, x)
    np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-6)


def _plain_normalize(x, scale, bias, eps):
    """BatchNorm's training-mode formula as written before `layers.normalize`, left to autodiff."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias, mean, var


@pytest.fixture
def normalize_inputs():
    k = jax.random.split(jax.random.key(3), 3)
    with jax.enable_x64(True):
        x = jax.random.normal(k[0], (4, 5, 5, 6), jnp.float64) * 3 + 2
        scale = jax.random.uniform(k[1], (6,), jnp.float64, 0.5, 1.5)
        bias = jax.random.normal(k[2], (6,), jnp.float64)
        yield x, scale, bias


@pytest.mark.slow
def test_normalize_derivatives_equal_autodiff_of_the_plain_formula(normalize_inputs):
    """Forward and reverse mode, every output (the statistics feed the moving averages), in float64."""
    args = normalize_inputs
    cot = jax.tree.map(
        lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), _plain_normalize(*args, 1e-3)
    )
    tan = tuple(jnp.sin(jnp.arange(a.size, dtype=a.dtype) + 1).reshape(a.shape) for a in args)
    for f in (layers.normalize, _plain_normalize):
        np.testing.assert_allclose(f(*args, 1e-3)[0], _plain_normalize(*args, 1e-3)[0], rtol=1e-12)
    mine_t = jax.jvp(lambda *a: layers.normalize(*a, 1e-3), args, tan)[1]
    ref_t = jax.jvp(lambda *a: _plain_normalize(*a, 1e-3), args, tan)[1]
    mine_g = jax.vjp(lambda *a: layers.normalize(*a, 1e-3), *args)[1](cot)
    ref_g = jax.vjp(lambda *a: _plain_normalize(*a, 1e-3), *args)[1](cot)
    for a, b in zip(jax.tree.leaves((mine_t, mine_g)), jax.tree.leaves((ref_t, ref_g))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    check_grads(lambda *a: layers.normalize(*a, 1e-3)[0], args, order=2, modes=["fwd", "rev"])


def test_normalize_of_a_constant_channel_has_finite_derivatives(normalize_inputs):
    x, scale, bias = normalize_inputs
    x = x.at[..., 0].set(1.5)  # variance exactly 0: the max(0, .) clamp is at its corner
    g = jax.grad(lambda x: jnp.sum(jnp.sin(layers.normalize(x, scale, bias, 1e-3)[0])))(x)
    assert np.isfinite(g).all()


@pytest.mark.slow
def test_forward_mode_runs_through_a_training_mode_model(setup):
    """A custom JVP (not a custom VJP) keeps jax.jvp, jacfwd and hessians available in train mode."""
    x, v = setup
    f = lambda x: Folded(True).apply(v, x, mutable=["batch_stats"])[0]
    _, t = jax.jvp(f, (x,), (jnp.ones_like(x),))
    _, t_ref = jax.jvp(
        lambda x: Reference(True).apply(v, x, mutable=["batch_stats"])[0], (x,), (jnp.ones_like(x),)
    )
    np.testing.assert_allclose(t, t_ref, rtol=1e-4, atol=1e-4)
