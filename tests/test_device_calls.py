"""On-device input path: each image once per epoch, fresh orders, the partial batch kept, exact eval."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIG, random_dataset

import resnet_jax as rj
from resnet_jax.device import batches, parallel, programs
from resnet_jax.device import data as device_data

pytestmark = pytest.mark.slow  # end-to-end: the whole file


def test_seed_epoch_is_1563_steps_with_the_partial_batch_kept():
    plan = batches.epoch_plan(50_000, 32, 100)
    assert sum(length for _, _, length, _ in plan) == 1563
    assert batches.steps_per_epoch(50_000, 32) == 1563
    assert plan[-1] == (1562 * 32, 1562, 1, 16)
    # contiguous: every call starts where the last ended
    ends = [off + length * batch for off, _, length, batch in plan]
    assert [off for off, *_ in plan[1:]] == ends[:-1] and ends[-1] == 50_000


@pytest.mark.parametrize("start", [0, 100, 700, 1562])
def test_resumed_plan_is_the_tail_of_the_full_plan(start):
    full = batches.epoch_plan(50_000, 32, 100)
    assert batches.epoch_plan(50_000, 32, 100, start) == [c for c in full if c[1] >= start]


def test_every_image_once_per_epoch_in_a_fresh_order():
    n, batch = 203, 16
    orders = []
    for epoch in range(3):
        key = batches.epoch_key(jax.random.key(0), epoch)
        perm = batches.permutation(key, n)
        seen = np.concatenate(
            [
                np.asarray(batches.chunk_rows(perm, off, length, b)).ravel()
                for off, _, length, b in batches.epoch_plan(n, batch, 5)
            ]
        )
        assert sorted(seen) == list(range(n))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_train_chunks_match_single_steps_on_the_same_batches(tiny_config, loop):
    """The scanned device path = gather + preprocess + augment + train_step, step by step."""
    ds = random_dataset(n_train=40)
    mean = rj.data.dataset.pixel_mean(ds.train_images)
    mesh = parallel.make_mesh()
    data = device_data.to_device(ds, mean, tiny_config, mesh)
    key = batches.epoch_key(jax.random.key(1), 0)
    perm = batches.permutation(key, 40)
    state = rj.create_train_state(tiny_config, jax.random.key(0), (32, 32, 3), 5)
    chunk = programs.TrainCall(mesh, loop)
    s1, m1 = chunk(state, data, perm, 0, 0, key, length=3, batch=8)

    state = rj.create_train_state(tiny_config, jax.random.key(0), (32, 32, 3), 5)
    step = jax.jit(rj.train_step)
    aug_key = jax.random.split(key)[1]
    losses = []
    for i in range(3):
        idx = np.asarray(perm[i * 8 : (i + 1) * 8])
        x = ds.train_images[idx].astype(np.float32) / 255 - mean
        x = rj.model.augment.augment(jax.random.fold_in(aug_key, i), jnp.asarray(x), tiny_config)
        state, m = step(state, x, ds.train_labels[idx])
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(np.asarray(m1["loss"]), losses, rtol=1e-5)
    # Every parameter, conv biases included: those feeding a BatchNorm are folded into it, get
    # exactly zero gradients and stay 0 (unfolded, float noise made Adam move them at random).
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
        if path[-1].key == "bias" and path[-2].key in ("conv_init", "conv1", "conv2"):
            np.testing.assert_array_equal(a, 0, err_msg=jax.tree_util.keystr(path))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s1.batch_stats, state.batch_stats
    )


def test_evaluation_is_exact_over_all_test_images(tiny_config):
    ds = random_dataset(n_test=37)  # not a multiple of the eval batch (16): padded and masked
    mean = rj.data.dataset.pixel_mean(ds.train_images)
    mesh = parallel.make_mesh()
    data = device_data.to_device(ds, mean, tiny_config, mesh)
    state = rj.create_train_state(tiny_config, jax.random.key(0), (32, 32, 3), 5)
    got = jax.device_get(programs.make_evaluate(tiny_config, mesh)(state, data))
    x = ds.test_images.astype(np.float32) / 255 - mean
    ref = jax.device_get(rj.eval_step(state, jnp.asarray(x), ds.test_labels))
    assert got["count"] == 37
    assert got["correct"] == ref["correct"]
    assert got["loss"] == pytest.approx(float(ref["loss"]), rel=1e-5)


class StopAt:
    """A stop request that arrives at the n-th time the loop asks (threading.Event's is_set)."""

    def __init__(self, n):
        self.n, self.asked = n, 0

    def is_set(self):
        self.asked += 1
        return self.asked >= self.n


# 7 steps an epoch, the last a partial batch of 4 (as the seed's 50,000 images end): calls of 2, 2,
# 2, 1; the uninterrupted run, once for the three stops below.
QUEUED = dataclasses.replace(TINY_CONFIG, device_loop="scan", steps_per_call=2, epochs=2)


@pytest.fixture(scope="module")
def queued_reference(tmp_path_factory):
    reference = str(tmp_path_factory.mktemp("queued") / "reference")
    rj.train_and_evaluate(QUEUED, reference, random_dataset(n_train=52), verbosity=0)
    return reference


@pytest.mark.parametrize("asked", [1, 2, 5])
def test_calls_queued_ahead_stop_and_resume_exactly(queued_reference, tmp_path, asked):
    # The scan loop keeps one call queued behind the one it reads (calls.Pace.ahead). A stop
    # request mid-epoch reads what is in flight, saves, and the resumed run equals an
    # uninterrupted one: metrics and the final state, bit for bit.
    from conftest import assert_same_run

    ds = random_dataset(n_train=52)
    workdir = str(tmp_path / "stopped")
    with pytest.raises(rj.errors.Interrupted, match=r"stopped at epoch 1, step \d/7"):
        rj.train_and_evaluate(QUEUED, workdir, ds, verbosity=0, stop=StopAt(asked))
    rj.train_and_evaluate(QUEUED, workdir, ds, verbosity=0)
    assert_same_run(workdir, queued_reference)
