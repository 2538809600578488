"""Where a checkpoint's inference-mode accuracy goes (issue 22): its BatchNorm moving statistics
against the statistics of its own weights.

For a saved run (`--workdir`, `--which latest|best`) and its dataset (`--data_dir`), prints one
JSON line with the test accuracy
  moving        in inference mode, the checkpoint's moving statistics (what val_acc reports);
  batch         in training mode: each test batch of `--batch_size` normalised by its own statistics;
  recalibrated  in inference mode, the moving statistics replaced by the mean of the batch
                statistics of `--batches` augmented training batches at the checkpoint's weights;
and the training accuracy (first `--train_images` training images, not augmented) with moving
statistics, and per BatchNorm layer how far the moving mean and variance are from the
recalibrated ones (relative to the recalibrated standard deviation). If `recalibrated` is far
above `moving`, the moving statistics lag the weights; if `batch` and `recalibrated` are low too,
the model itself generalises less.

    python experiments/keras_parity/bn_diagnosis.py --workdir /tmp/run \
        --data_dir ../shared/data/cifar10-jpeg75.tar.gz
"""

from __future__ import annotations

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)  # what the benchmarks share: keras_baseline, common, jsonl, hlo_text

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import resnet_jax as rj
from resnet_jax.model.augment import augment as seed_augment


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--which", default="latest", choices=("latest", "best"))
    p.add_argument("--data_dir", required=True)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--train_images", type=int, default=10000)
    a = p.parse_args()

    state, progress, step = rj.checkpoint.restore_with_meta(a.workdir, a.which)
    data = rj.load_dataset(data_dir=a.data_dir)
    mean = np.asarray(state.pixel_mean)
    momentum = state.config.bn_momentum if hasattr(state.config, "bn_momentum") else 0.99

    def prep(x):
        return jnp.asarray(x, jnp.float32) / 255.0 - mean

    @jax.jit
    def infer_correct(variables, x, y):
        logits = state.apply_fn(variables, prep(x), train=False)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    @jax.jit
    def batch_correct(variables, x, y):
        logits, _ = state.apply_fn(variables, prep(x), train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.argmax(logits, -1) == y)

    @jax.jit
    def batch_stats_of(variables, x, key):
        # the batch's own statistics: moving' = m * moving + (1 - m) * batch
        images = seed_augment(key, prep(x), state.config)
        _, upd = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        return jax.tree.map(
            lambda new, old: (new - momentum * old) / (1 - momentum),
            upd["batch_stats"],
            variables["batch_stats"],
        )

    def accuracy(fn, variables, x, y, bs):
        n = len(x) // bs * bs
        return float(sum(int(fn(variables, x[i : i + bs], y[i : i + bs])) for i in range(0, n, bs)) / n)

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out = {"workdir": a.workdir, "step": step, "epoch": progress.epoch}
    out["moving"] = accuracy(infer_correct, variables, data.test_images, data.test_labels, 500)
    out["batch"] = accuracy(batch_correct, variables, data.test_images, data.test_labels, a.batch_size)
    xt, yt = data.train_images[: a.train_images], data.train_labels[: a.train_images]
    out["train_moving"] = accuracy(infer_correct, variables, xt, yt, 500)

    rng = np.random.default_rng(0)
    total = None
    for i in range(a.batches):
        idx = rng.choice(len(data.train_images), a.batch_size, replace=False)
        s = jax.device_get(batch_stats_of(variables, data.train_images[idx], jax.random.key(i)))
        total = s if total is None else jax.tree.map(np.add, total, s)
    recal = jax.tree.map(lambda t: t / a.batches, total)
    recal_vars = {"params": state.params, "batch_stats": recal}
    out["recalibrated"] = accuracy(infer_correct, recal_vars, data.test_images, data.test_labels, 500)
    out["train_recalibrated"] = accuracy(infer_correct, recal_vars, xt, yt, 500)

    # per layer: |moving - recalibrated| / recalibrated std, averaged over channels
    flat_m = jax.tree_util.tree_flatten_with_path(jax.device_get(state.batch_stats))[0]
    flat_r = dict(jax.tree_util.tree_flatten_with_path(recal)[0])
    layers = {}
    for path, m in flat_m:
        r = flat_r[path]
        name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
        kind = str(getattr(path[-1], "key", path[-1]))
        layers.setdefault(name, {})[kind] = (np.asarray(m), np.asarray(r))
    gaps = {}
    for name, d in layers.items():
        (mm, rm), (mv, rv) = d["mean"], d["var"]
        sd = np.sqrt(rv + 1e-3)
        gaps[name] = {
            "mean_gap_sd": round(float(np.mean(np.abs(mm - rm) / sd)), 4),
            "var_ratio": round(float(np.mean(mv / (rv + 1e-12))), 4),
        }
    out["layers"] = gaps
    print(json.dumps(out))


if __name__ == "__main__":
    main()
