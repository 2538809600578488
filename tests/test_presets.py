"""The Keras example's ResNet family (v1 and v2) as presets, and the held-out validation split."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, random_dataset, train, train_on
from digits import DIGITS, digits_dataset

import resnet_jax as rj
from resnet_jax.presets import PRESETS, preset

KERAS_N = {  # the example's table: depth -> n, per version
    1: {20: 3, 32: 5, 44: 7, 56: 9, 110: 18, 164: 27},
    2: {20: 2, 56: 6, 110: 12, 164: 18, 1001: 111},
}


def count_from_description(version, n, f=16, classes=10, channels=3):
    """(parameters, BN statistics) of the example's model, walked from its description."""
    params = stats = 0

    def conv(k, cin, cout):
        nonlocal params
        params += k * k * cin * cout + cout  # every conv has a bias

    def bn(c):
        nonlocal params, stats
        params, stats = params + 2 * c, stats + 2 * c

    conv(3, channels, f)
    bn(f)
    c = f
    if version == 1:
        for stage in range(3):
            width = f * 2**stage
            for block in range(n):
                conv(3, c, width), bn(width), conv(3, width, width), bn(width)
                if stage > 0 and block == 0:
                    conv(1, c, width)
                c = width
    else:
        width = f
        for stage in range(3):
            out = width * (4 if stage == 0 else 2)
            for block in range(n):
                if not (stage == 0 and block == 0):
                    bn(c)
                conv(1, c, width), bn(width), conv(3, width, width), bn(width), conv(1, width, out)
                if block == 0:
                    conv(1, c, out)
                c = out
            width = out
        bn(c)
    params += c * classes + classes
    return params, stats


def sizes(config):
    model = rj.model.resnet.from_config(config)
    v = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False), jax.random.key(0))
    return sum(x.size for x in jax.tree.leaves(v["params"])), sum(
        x.size for x in jax.tree.leaves(v["batch_stats"])
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p in PRESETS if p != "seed"])
def test_every_preset_has_the_examples_size(name):
    config = preset(name)
    version, depth = int(name[-1]), int(name[len("resnet") : -2])
    n = KERAS_N[version][depth]
    assert config.stage_sizes == (n, n, n) and config.num_filters == 16 and config.resnet_version == version
    assert sizes(config) == count_from_description(version, n)
    assert rj.model.resnet.name(config) == f"ResNet{depth}v{version}"


def test_known_keras_totals():
    # The Keras summaries' totals (trainable + non-trainable): ResNet20v1 274,442; ResNet56v2 1,673,738.
    assert sum(sizes(preset("resnet20v1"))) == 274_442
    assert sum(sizes(preset("resnet56v2"))) == 1_673_738
    assert sizes(preset("seed")) == (790_090, 2_240)


@pytest.mark.parametrize("name", ["resnet20v1", "resnet110v2"])
def test_preset_schedule_is_the_examples(name):
    config = preset(name)
    expected = {
        1: 1e-3,
        81: 1e-3,
        82: 1e-4,
        121: 1e-4,
        122: 1e-5,
        161: 1e-5,
        162: 1e-6,
        181: 1e-6,
        182: 5e-7,
        200: 5e-7,
    }
    spe = 1563
    sched = rj.model.optim.schedule(config, spe)
    for epoch, rate in expected.items():
        assert rj.model.optim.lr_for_epoch(config, epoch) == pytest.approx(rate, rel=1e-6)
        assert float(sched((epoch - 1) * spe)) == pytest.approx(rate, rel=1e-6)  # its first step
        assert float(sched(epoch * spe - 1)) == pytest.approx(rate, rel=1e-6)  # and its last
    assert (config.epochs, config.batch_size, config.learning_rate, config.l2_weight) == (200, 32, 1e-3, 1e-4)
    assert (config.shift_range, config.flip, config.adam_eps) == (0.1, True, 1e-7)


def test_unknown_preset_names_the_choices():
    with pytest.raises(rj.UserError, match="resnet1001v2"):
        preset("resnet18")


def reference_v2(params, stats, x, n, eps=1e-3):
    """ResNet v2 written out by hand from the example: lax convolutions and explicit BatchNorm."""

    def conv(p, x, stride=1):
        y = jax.lax.conv_general_dilated(
            x,
            p["kernel"],
            (stride, stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        return y + p["bias"]

    def bn(p, s, x):
        return (x - s["mean"]) / jnp.sqrt(s["var"] + eps) * p["scale"] + p["bias"]

    relu = jax.nn.relu
    x = relu(bn(params["bn_init"], stats["bn_init"], conv(params["conv_init"], x)))
    for stage in range(3):
        for block in range(n):
            p, s = params[f"stage{stage + 1}_block{block + 1}"], stats[f"stage{stage + 1}_block{block + 1}"]
            stride = 2 if stage > 0 and block == 0 else 1
            y = x if stage == 0 and block == 0 else relu(bn(p["bn1"], s["bn1"], x))
            y = conv(p["conv1"], y, stride)
            y = conv(p["conv2"], relu(bn(p["bn2"], s["bn2"], y)))
            y = conv(p["conv3"], relu(bn(p["bn3"], s["bn3"], y)))
            x = (conv(p["proj"], x, stride) if block == 0 else x) + y
    x = relu(bn(params["bn_final"], stats["bn_final"], x)).mean((1, 2))
    return x @ params["head"]["kernel"] + params["head"]["bias"]


@pytest.mark.slow
def test_v2_forward_pass_equals_a_hand_written_reference():
    config = preset("resnet20v2")
    model = rj.model.resnet.from_config(config)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    fast = {"xla_backend_optimization_level": 0}  # as init_state: XLA:CPU is slow to optimise RNG
    v = jax.jit(lambda k: model.init(k, x, train=False), compiler_options=fast)(jax.random.key(1))

    # non-trivial values everywhere (biases, BN scales and statistics), so every term matters
    rng = np.random.default_rng(2)  # numpy: drawing with jax compiles a program per array shape
    v = jax.tree.map(lambda a: np.float32(a * rng.uniform(0.5, 1.5, a.shape) + 0.1), v)
    with jax.default_matmul_precision("float32"):
        got = jax.jit(lambda v: model.apply(v, x, train=False))(v)
    want = jax.jit(reference_v2, static_argnames="n")(v["params"], v["batch_stats"], x, n=2)  # one compile
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # L2 covers every conv kernel, the projections included, and no dense kernel
    kernels = [
        w
        for path, w in jax.tree_util.tree_leaves_with_path(v["params"])
        if path[-1].key == "kernel" and w.ndim == 4
    ]
    assert len(kernels) == 1 + 3 * 2 * 3 + 3  # stem, 3 stages x 2 blocks x 3 convs, 3 projections
    expected = config.l2_weight * sum(float(np.sum(np.square(np.asarray(w, np.float64)))) for w in kernels)
    penalty = jax.jit(rj.model.steps.l2_penalty, static_argnums=1)(
        v["params"], config
    )  # one compile, not one an op
    assert float(penalty) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resnet20v2_learns_digits(tmp_path, dtype, compiled_as_users_compile):
    """resnet20v2's blocks (v2, n = 2) at half width, 6 epochs: a short run on CPU. BatchNorm's
    moving averages at momentum 0.9 settle within the 45 steps of an epoch (0.99 would not)."""
    config = dataclasses.replace(
        DIGITS,
        resnet_version=2,
        num_filters=8,
        stage_sizes=(2, 2, 2),
        dtype=dtype,
        epochs=6,
        lr_epochs=(5,),
        bn_momentum=0.9,
    )
    digits = digits_dataset(scale=1, channels=1)  # the digits as they are, 8x8x1: the same labels
    _, history = rj.train_and_evaluate(config, str(tmp_path / "w"), digits, verbosity=0)
    assert history[-1]["val_acc"] >= 0.93, history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


@pytest.mark.slow
def test_preset_through_the_command_line(archive, tmp_path):
    workdir = str(tmp_path / "w")
    out = train_on(
        workdir,
        archive,
        *"--preset resnet20v2 --epochs 1 --batch_size 24 --num_filters 4".split(),  # one call shape
    ).stdout
    assert "Model: ResNet v2, 4 filters, blocks 2,2,2 (preset resnet20v2)" in out
    with open(os.path.join(workdir, "run.json")) as f:
        config = json.load(f)["config"]
    assert config["preset"] == "resnet20v2" and config["resnet_version"] == 2 and config["num_filters"] == 4
    assert config["lr_epochs"] == [81, 121, 161, 181] and config["epochs"] == 1  # flags override
    helptext = train("--help").stdout
    assert "resnet1001v2" in helptext and "resnet20v1" in helptext


# Held-out validation ------------------------------------------------------------------------------


def test_holdout_is_disjoint_stratified_and_deterministic():
    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 100, 100, 100, 100, 37])
    a = rj.data.dataset.holdout_indices(labels, 0.1, seed=0)
    assert np.array_equal(a, rj.data.dataset.holdout_indices(labels, 0.1, seed=0))
    assert not np.array_equal(a, rj.data.dataset.holdout_indices(labels, 0.1, seed=1))
    assert len(a) == round(0.1 * len(labels)) and len(set(a)) == len(a)
    per_class = np.bincount(labels[a], minlength=10)
    assert per_class[:9].tolist() == [10] * 9 and per_class[9] in (3, 4)
    assert len(rj.data.dataset.holdout_indices(labels, 250, seed=0)) == 250
    ds = random_dataset(n_train=60)
    train_part, idx = rj.data.dataset.split_holdout(ds, 12, seed=0)
    assert len(train_part.train_images) == 48 and len(train_part.test_images) == 12
    rest = np.setdiff1d(np.arange(60), idx)
    np.testing.assert_array_equal(train_part.train_images, ds.train_images[rest])
    np.testing.assert_array_equal(train_part.test_images, ds.train_images[idx])


@pytest.mark.slow
def test_the_test_set_never_enters_training_or_checkpoint_choice(tmp_path):
    config = rj.presets.tiny(batch_size=8, eval_batch_size=16, epochs=3, val_split=16)
    ds = random_dataset(n_train=64, n_test=24)
    other = rj.Dataset(
        ds.train_images, ds.train_labels, ds.test_images[::-1] // 2 + 7, (ds.test_labels + 3) % 10, 10
    )
    a, history_a = rj.train_and_evaluate(config, str(tmp_path / "a"), ds, verbosity=0)
    b, history_b = rj.train_and_evaluate(config, str(tmp_path / "b"), other, verbosity=0)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(history_a) == strip(history_b) and history_a[0]["val_on"] == "held-out"
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    best_a, best_b = rj.restore(str(tmp_path / "a"), "best"), rj.restore(str(tmp_path / "b"), "best")
    jax.tree.map(np.testing.assert_array_equal, best_a.params, best_b.params)
    # and the validation numbers are the held-out images', not the test set's
    _, idx = rj.data.dataset.split_holdout(ds, 16, seed=0)
    held = rj.Dataset(ds.train_images[:8], ds.train_labels[:8], ds.train_images[idx], ds.train_labels[idx])
    loss, acc = rj.evaluate_checkpoint(str(tmp_path / "a"), "latest", dataset=held)
    assert acc == pytest.approx(history_a[-1]["val_acc"]) and loss == pytest.approx(history_a[-1]["val_loss"])


@pytest.mark.slow
def test_a_split_run_resumes_with_its_split_and_refuses_another(archive, tmp_path):
    workdir = str(tmp_path / "w")
    out = train(
        "--workdir", workdir, "--data_dir", archive, "--epochs", "1", "--val_split", "0.2", *TINY
    ).stdout
    assert "Validation: 19 training images held out" in out and "Test accuracy" in out
    with open(os.path.join(workdir, "holdout.json")) as f:
        held = json.load(f)
    assert len(held) == 19  # 0.2 of 96, stratified
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert json.loads(f.readline())["val_on"] == "held-out"
    again = train("--workdir", workdir, "--data_dir", archive, "--epochs", "2", "--val_split", "0.2", *TINY)
    assert "Resuming" in again.stdout
    with open(os.path.join(workdir, "holdout.json")) as f:
        assert json.load(f) == held
    other = train(
        "--workdir", workdir, "--data_dir", archive, "--epochs", "3", "--val_split", "0.3", *TINY, check=False
    )
    assert other.returncode == 2 and "val_split" in other.stderr


@pytest.mark.parametrize("split", ["100", "500", "1.5"])
def test_a_split_too_large_is_one_line(archive, tmp_path, split):
    proc = train(
        "--workdir", str(tmp_path / "w"), "--data_dir", archive, "--val_split", split, *TINY, check=False
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "val_split" in lines[0], proc.stderr
