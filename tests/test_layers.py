"""layers.Conv + layers.BatchNorm compute what Flax's nn.Conv -> nn.BatchNorm compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import layers


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
