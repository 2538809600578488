"""train_step / eval_step: the loss is CE + L2 on conv kernels, BN moves by momentum 0.99."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch

import resnet_jax as rj


@pytest.fixture
def state(tiny_config):
    return rj.create_train_state(tiny_config, jax.random.key(0), (32, 32, 3), steps_per_epoch=10)


def test_a_new_state_is_not_committed_to_the_host_cpu(state):
    """init_state computes on the host CPU, but its arrays stay uncommitted: a notebook's
    jax.jit(train_step) places them with its inputs (on a GPU, arrays committed to the CPU would
    refuse the GPU's images: "incompatible devices")."""
    leaves = jax.tree.leaves((state.step, state.params, state.batch_stats, state.opt_state))
    assert leaves and not any(leaf.committed for leaf in leaves)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def conv_l2(params):
    """1e-4 * sum of squares of every conv kernel, found by module name (not by rank)."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [p.key for p in path]
        if names[-1] == "kernel" and names[-2] in ("conv_init", "conv1", "conv2", "proj"):
            total += float(np.sum(np.asarray(leaf, np.float64) ** 2))
    return 1e-4 * total


@pytest.mark.slow
def test_train_loss_is_cross_entropy_plus_conv_l2(state):
    x, y = random_batch()
    logits, _ = state.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    ce = -np.mean(log_softmax(np.asarray(logits, np.float64))[np.arange(8), np.asarray(y)])
    expected = ce + conv_l2(state.params)
    _, metrics = jax.jit(rj.train_step)(state, x, y)
    assert float(metrics["count"]) == 8
    assert float(metrics["loss"]) / 8 == pytest.approx(expected, rel=1e-5)
    assert conv_l2(state.params) > 1e-3  # the L2 term is not negligible at init
    assert float(rj.model.steps.l2_penalty(state.params, state.config)) == pytest.approx(
        conv_l2(state.params), rel=1e-5
    )


def test_l2_layers_and_weight_come_from_config(state):
    both = dataclasses.replace(state.config, l2_layers=("conv", "dense"), l2_weight=2e-4)
    dense = float(np.sum(np.asarray(state.params["head"]["kernel"], np.float64) ** 2))
    got = float(rj.model.steps.l2_penalty(state.params, both))
    assert got == pytest.approx(2 * conv_l2(state.params) + 2e-4 * dense, rel=1e-5)


@pytest.mark.slow
def test_eval_metrics_and_masking(state):
    x, y = random_batch(seed=3)
    logits = state.model.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
    lp = log_softmax(np.asarray(logits, np.float64))[np.arange(8), np.asarray(y)]
    m = rj.eval_step(state, x, y)
    assert float(m["loss"]) / 8 == pytest.approx(-lp.mean() + conv_l2(state.params), rel=1e-5)
    correct = np.sum(np.argmax(logits, -1) == np.asarray(y))
    assert float(m["correct"]) == correct
    w = jnp.array([1, 1, 1, 0, 0, 1, 0, 1], jnp.float32)
    mw = rj.eval_step(state, x, y, w)
    assert float(mw["count"]) == 5
    assert float(mw["loss"]) / 5 == pytest.approx(
        -lp[np.asarray(w) > 0].mean() + conv_l2(state.params), rel=1e-5
    )


def test_batch_stats_move_by_momentum(state):
    x, y = random_batch(seed=1)
    # Input of the first BatchNorm: the stem conv's output, with the pre-step parameters.
    _, inter = state.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    conv_out = inter["intermediates"]["conv_init"]["__call__"][0]  # bias folded into bn_init
    bias = state.params["conv_init"]["bias"]
    h = np.asarray(conv_out, np.float64) + np.asarray(bias, np.float64)
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    new, _ = jax.jit(rj.train_step)(state, x, y)
    bn = new.batch_stats["bn_init"]
    np.testing.assert_allclose(bn["mean"], 0.99 * 0 + 0.01 * mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(bn["var"], 0.99 * 1 + 0.01 * var, rtol=1e-5)
    assert int(new.step) == 1
    # Every BN layer's statistics moved; eval_step returns metrics only and changes nothing.
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.batch_stats, new.batch_stats)
    assert all(jax.tree.leaves(moved))
    before = jax.tree.map(np.array, new.batch_stats)
    rj.eval_step(new, x, y)
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(new.batch_stats))


def test_train_and_eval_modes_differ(state):
    x, _ = random_batch(seed=2)
    v = {"params": state.params, "batch_stats": state.batch_stats}
    train_logits, _ = state.model.apply(v, x, train=True, mutable=["batch_stats"])
    eval_logits = state.model.apply(v, x, train=False)
    assert np.max(np.abs(np.asarray(train_logits) - np.asarray(eval_logits))) > 1e-3


@pytest.mark.slow
def test_steps_lower_loss_and_are_deterministic(tiny_config):
    x, y = random_batch(n=16, seed=4)

    def run(seed):
        s = rj.create_train_state(tiny_config, jax.random.key(seed), (32, 32, 3), 10)
        step = jax.jit(rj.train_step)
        losses = []
        for _ in range(8):
            s, m = step(s, x, y)
            losses.append(float(m["loss"] / m["count"]))
        return s, losses

    s1, l1 = run(0)
    s2, l2 = run(0)
    s3, l3 = run(1)
    assert l1[-1] < 0.9 * l1[0]
    assert l1 == l2
    jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
    assert l1 != l3


def test_bad_inputs_are_clear(state):
    x, y = random_batch()
    with pytest.raises(rj.UserError, match="images must be a batch of shape"):
        rj.train_step(state, x[0], y)
    with pytest.raises(rj.UserError, match=r"labels must be in \[0, 10\)"):
        rj.train_step(state, x, y.at[0].set(10))
    with pytest.raises(rj.UserError, match="labels must have shape"):
        rj.eval_step(state, x, y[:3])
    for field in ("batch_size", "epochs"):
        for bad in (0, -1):
            with pytest.raises(rj.UserError, match=f"{field} must be a positive integer"):
                rj.Config(**{field: bad})
    with pytest.raises(rj.UserError, match="dtype must be one of"):
        rj.Config(dtype="float16")
    with pytest.raises(rj.UserError, match="image_shape"):
        rj.create_train_state(rj.presets.tiny(), jax.random.key(0), (32, 32), 1)


def test_config_round_trips_and_defaults_are_the_seed():
    c = rj.Config()
    assert (c.epochs, c.batch_size, c.stage_sizes, c.num_filters, c.learning_rate) == (
        50,
        32,
        (3, 3, 2),
        32,
        1e-3,
    )
    assert (c.adam_b1, c.adam_b2, c.adam_eps, c.l2_weight, c.shift_range) == (0.9, 0.999, 1e-7, 1e-4, 0.1)
    assert rj.Config.from_json(c.to_json()) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.epochs = 3


@pytest.mark.slow
def test_moving_statistics_are_the_exponential_average_of_the_batch_statistics(tiny_config):
    """After many steps each BatchNorm's moving mean and variance equal an exponential average
    (momentum 0.99, from 0 and 1) of the batch statistics of its input, computed here in float64
    from the conv outputs the model produces at each step (plus the conv bias it folds in)."""
    from resnet_jax.model import layers

    state = rj.create_train_state(tiny_config, jax.random.key(0), (16, 16, 3), steps_per_epoch=10)
    step = jax.jit(rj.train_step)

    @jax.jit
    def conv_outputs(state, x):
        _, inter = state.apply_fn(
            state.variables(),
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: isinstance(module, layers.Conv),
        )
        return inter["intermediates"]

    def bn_inputs(inter, params, prefix=()):
        """{bn path: its input} from the captured conv outputs: bn_init <- conv_init, bnK <- convK."""
        out = {}
        for name, value in inter.items():
            if isinstance(value, dict) and "__call__" not in value:
                out.update(bn_inputs(value, params[name], prefix + (name,)))
            elif name.startswith("conv"):
                bn = "bn_init" if name == "conv_init" else "bn" + name[len("conv") :]
                out[prefix + (bn,)] = np.asarray(value["__call__"][0], np.float64) + np.asarray(
                    params[name]["bias"], np.float64
                )
        return out

    ema = {}
    rng = np.random.default_rng(0)
    for i in range(150):
        scale = 1 + 0.5 * np.sin(i / 10)  # inputs whose statistics drift, as weights do in training
        x = jnp.asarray(rng.normal(0.2, scale, (8, 16, 16, 3)), jnp.float32)
        y = rng.integers(0, 10, 8)
        for path, h in bn_inputs(
            jax.device_get(conv_outputs(state, x)), jax.device_get(state.params)
        ).items():
            mean, var = ema.get(path, (np.zeros(h.shape[-1]), np.ones(h.shape[-1])))
            ema[path] = (0.99 * mean + 0.01 * h.mean((0, 1, 2)), 0.99 * var + 0.01 * h.var((0, 1, 2)))
        state, _ = step(state, x, y)
    assert len(ema) == 7  # stem + 2 per block, 3 blocks
    for path, (mean, var) in ema.items():
        stats = state.batch_stats
        for p in path:
            stats = stats[p]
        np.testing.assert_allclose(stats["mean"], mean, rtol=1e-4, atol=1e-6, err_msg=str(path))
        np.testing.assert_allclose(stats["var"], var, rtol=1e-4, atol=1e-6, err_msg=str(path))
