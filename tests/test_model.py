"""The default model is the seed's: parameter counts and per-layer shapes of its summary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj

# (kind, output shape, parameter count) of every Conv / BatchNorm / Dense layer in the seed's
# Keras model summary, in its order (shared/seed/000_0413040105300225.txt).
C, B = "conv", "bn"


def stage(shape, conv, first_conv, proj, bn, blocks):
    """A stage's rows: its first block (conv1, bn1, conv2, proj, bn2), then (conv, bn) pairs."""
    rows = [(C, shape, first_conv), (B, shape, bn), (C, shape, conv), (C, shape, proj), (B, shape, bn)]
    return rows + [(C, shape, conv), (B, shape, bn)] * (2 * blocks - 2)


SEED = (
    [(C, (32, 32, 32), 896), (B, (32, 32, 32), 128)]
    + [(C, (32, 32, 32), 9248), (B, (32, 32, 32), 128)] * 6
    + stage((16, 16, 64), 36928, first_conv=18496, proj=2112, bn=256, blocks=3)
    + stage((8, 8, 128), 147584, first_conv=73856, proj=8320, bn=512, blocks=2)
    + [("dense", (10,), 1290)]
)


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def output(captured):
    """A layer's captured output; a conv that folds its bias into the next BatchNorm returns
    (conv(x), bias)."""
    out = captured["__call__"][0]
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def seed_model():
    model = rj.ResNet()
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
    return variables, inter["intermediates"]


@pytest.mark.slow
def test_parameter_counts_match_seed(seed_model):
    variables, _ = seed_model
    assert set(variables) == {"params", "batch_stats"}
    assert count(variables["params"]) == 790_090
    assert count(variables["batch_stats"]) == 2_240
    assert count(variables) == 792_330


def keras_order(variables, inter):
    """Our layers listed the way Keras summarises them (conv1, bn1, conv2, proj, bn2 per block)."""
    params, stats = variables["params"], variables["batch_stats"]
    rows = []

    def conv(scope, name):
        p = params[scope][name] if scope else params[name]
        out = output(inter[scope][name] if scope else inter[name])
        rows.append((C, out.shape[1:], count(p)))

    def bn(scope, name):
        p = params[scope][name] if scope else params[name]
        s = stats[scope][name] if scope else stats[name]
        out = output(inter[scope][name] if scope else inter[name])
        rows.append((B, out.shape[1:], count(p) + count(s)))

    conv(None, "conv_init"), bn(None, "bn_init")
    blocks = sorted((k for k in params if k.startswith("stage")), key=lambda k: (k[5], int(k[12:])))
    for blk in blocks:
        conv(blk, "conv1"), bn(blk, "bn1"), conv(blk, "conv2")
        if "proj" in params[blk]:
            conv(blk, "proj")
        bn(blk, "bn2")
    rows.append(("dense", inter["head"]["__call__"][0].shape[1:], count(params["head"])))
    return rows


def test_layer_shapes_and_counts_match_seed_summary(seed_model):
    assert keras_order(*seed_model) == SEED


def test_three_three_three_is_the_larger_model():
    v = rj.ResNet(stage_sizes=(3, 3, 3)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    assert count(v) == 1_088_522


def test_batchnorm_settings_and_initial_values(seed_model):
    variables, _ = seed_model
    bn = variables["batch_stats"]["bn_init"]
    np.testing.assert_array_equal(bn["mean"], 0)
    np.testing.assert_array_equal(bn["var"], 1)
    np.testing.assert_array_equal(variables["params"]["bn_init"]["scale"], 1)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        if path[-1].key == "bias":
            np.testing.assert_array_equal(leaf, 0)
    model = rj.ResNet()
    assert (model.bn_momentum, model.bn_epsilon) == (0.99, 1e-3)


def test_kernels_are_he_normal():
    """Truncated normal, fan_in, scale 2: std sqrt(2 / fan_in), nothing past 2 std."""
    v = rj.ResNet().init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
    k = np.asarray(v["params"]["stage3_block2"]["conv1"]["kernel"])
    std = np.sqrt(2 / (3 * 3 * 128))
    assert abs(k.std() / std - 1) < 0.02
    assert np.abs(k).max() <= 2 * std / 0.87962566 + 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(20, 28, 1), (32, 32, 3), (9, 9, 5)])
def test_any_input_size_and_channels(shape):
    model = rj.ResNet(stage_sizes=(1, 1), num_filters=4, num_classes=7)
    x = jnp.ones((2,) + shape)
    v = model.init(jax.random.key(0), x, train=False)
    assert model.apply(v, x, train=False).shape == (2, 7)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_variables():
    model = rj.ResNet(stage_sizes=(1, 1), num_filters=4, dtype=jnp.bfloat16)
    x = jnp.ones((2, 16, 16, 3))
    v = model.init(jax.random.key(0), x, train=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
    _, inter = model.apply(v, x, train=False, capture_intermediates=True)
    assert output(inter["intermediates"]["conv_init"]).dtype == jnp.bfloat16
    assert model.apply(v, x, train=False).dtype == jnp.float32


@pytest.mark.parametrize(
    "fields,shape",
    [
        ({}, (32, 32, 3)),
        (dict(num_filters=4, stage_sizes=(1, 1, 1)), (32, 32, 3)),
        (dict(num_filters=6, stage_sizes=(2, 1), num_classes=3), (15, 9, 1)),
    ],
)
def test_forward_flops_counts_every_conv_and_the_head(fields, shape):
    """The analytic count (used before JAX starts) equals 2 x MACs read off the traced layers."""
    config = rj.Config(**fields)
    model = rj.model.resnet.from_config(config)
    x = jnp.zeros((1,) + shape)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    _, inter = jax.eval_shape(lambda v: model.apply(v, x, train=False, capture_intermediates=True), variables)
    traced = 0

    def walk(params, out):
        nonlocal traced
        for name, sub in params.items():
            if not isinstance(sub, dict):
                continue
            if "kernel" in sub:
                spatial = output(out[name]).shape[1:-1]
                traced += 2 * int(np.prod(spatial)) * int(np.prod(sub["kernel"].shape))
            else:
                walk(sub, out[name])

    walk(variables["params"], inter["intermediates"])
    assert rj.model.resnet.forward_flops(config, shape) == traced
    if not fields:
        assert traced == 286_984_704  # the seed model: 0.287 GFLOP an image


@pytest.mark.slow
def test_materialize_is_an_exact_identity_that_xla_keeps():
    """models.materialize must not change a value or a gradient, and must survive compilation
    (a division XLA does not fold), else the residual stream is recomputed again (README "Speed")."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3)) * 1e3
    x = x.at[0, 0, 0, 0].set(0.0).at[0, 0, 0, 1].set(-1e-30)  # (XLA:CPU flushes subnormals in any op)
    f = jax.jit(rj.model.resnet.materialize)
    np.testing.assert_array_equal(f(x), x)
    g = jax.grad(lambda x: jnp.sum(rj.model.resnet.materialize(x) * jnp.arange(x.size).reshape(x.shape)))(x)
    np.testing.assert_array_equal(g, jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
    assert "divide" in f.lower(x).compile().as_text()
