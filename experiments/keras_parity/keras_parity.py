"""resnet_jax against Keras 3 step by step: the seed model with the same initial weights, trained on
the same (augmented) batches of real images, compared as it goes.

    python experiments/keras_parity/keras_parity.py \
        --data_dir ../shared/data/cifar10-jpeg75.tar.gz [--steps 300]

Keras builds the seed model (benchmarks/keras_baseline.py) and draws its weights; they are copied
into resnet_jax's ResNet (kernels, biases, BatchNorm scales, offsets and moving statistics). Both
then train on the same batches (the seed's augmentation drawn once by resnet_jax and fed to both),
Keras with `train_on_batch` (its Adam, its L2 regularizers, its BatchNorm), resnet_jax with
`train_step`. Every --every steps one JSON line: both losses, and how far apart the parameters and
the BatchNorm moving statistics are (the largest relative difference over the layers); at the
end, both models' inference-mode accuracy on the test set. A systematic difference in how the
moving statistics are kept shows up as a gap that grows with the steps.

After each epoch (a fresh order each epoch, the partial last batch kept) one more line: both
sides' training accuracy over the epoch on this shared stream and their test accuracy. Long after
the two trajectories have parted, these say whether the step itself trains better on one side
(issue 22: on their own streams Keras's training accuracy ran ahead):

    KERAS_BACKEND=jax python experiments/keras_parity/keras_parity.py --data_dir D --num_filters 8 \
        --steps 7815 --every 1563
"""

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)  # what the benchmarks share: keras_baseline, common, jsonl, hlo_text

import argparse
import dataclasses
import json

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def keras_layers(model, kind):
    """The model's layers of a class, in the order they were created (Keras numbers their names)."""
    layers = [layer for layer in model.layers if type(layer).__name__ == kind]
    number = lambda name: int(name.rsplit("_", 1)[1]) if name.rsplit("_", 1)[-1].isdigit() else 0
    return sorted(layers, key=lambda layer: number(layer.name))


def flax_order(params):
    """resnet_jax's conv / BatchNorm paths in the order Keras creates its layers."""
    convs, norms = [("conv_init",)], [("bn_init",)]
    for block in sorted((k for k in params if k.startswith("stage")), key=lambda k: (int(k[5]), int(k[12:]))):
        convs += [(block, "conv1"), (block, "conv2")] + ([(block, "proj")] if "proj" in params[block] else [])
        norms += [(block, "bn1"), (block, "bn2")]
    return convs, norms


def get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def copy_weights(kmodel, state):
    """`state` with the Keras model's variables: kernels, biases, BatchNorm scales, offsets and
    moving statistics (and a fresh optimizer state for them)."""
    import jax
    import numpy as np

    params, stats = jax.tree.map(np.array, (state.params, state.batch_stats))
    convs, norms = flax_order(params)
    kconvs, knorms = keras_layers(kmodel, "Conv2D"), keras_layers(kmodel, "BatchNormalization")
    assert len(kconvs) == len(convs) and len(knorms) == len(norms)
    for path, layer in zip(convs, kconvs):
        kernel, bias = layer.get_weights()
        get(params, path).update(kernel=kernel, bias=bias)
    for path, layer in zip(norms, knorms):
        gamma, beta, moving_mean, moving_var = layer.get_weights()
        get(params, path).update(scale=gamma, bias=beta)
        get(stats, path).update(mean=moving_mean, var=moving_var)
    kernel, bias = keras_layers(kmodel, "Dense")[0].get_weights()
    params["head"].update(kernel=kernel, bias=bias)
    return state.replace(params=params, batch_stats=stats, opt_state=state.tx.init(params))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_filters", type=int, default=32, help="both models' width (seed: 32)")
    p.add_argument("--limit", type=int, default=0, help="train on N random images only (a quick check)")
    a = p.parse_args()
    import jax
    import keras
    import numpy as np
    from keras_baseline import build

    import resnet_jax as rj
    from resnet_jax.model import optim, resnet, steps

    ds = rj.load_dataset("cifar10", data_dir=a.data_dir)
    mean = rj.data.dataset.pixel_mean(ds.train_images)
    config = rj.Config(num_filters=a.num_filters)
    keras.utils.set_random_seed(a.seed)
    kmodel = build(keras, config.num_filters, config.stage_sizes, 10)
    kmodel.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    model = resnet.from_config(config, materialize=False)
    tx = optim.make_optimizer(config, 1563)
    state = steps.init_state(model, tx, config, jax.random.key(a.seed), (32, 32, 3))
    state = copy_weights(kmodel, state)
    convs, norms = flax_order(state.params)
    kconvs, knorms = keras_layers(kmodel, "Conv2D"), keras_layers(kmodel, "BatchNormalization")

    step = jax.jit(rj.train_step)
    rng = np.random.default_rng(a.seed)
    if a.limit:
        keep = rng.permutation(len(ds.train_images))[: a.limit]
        ds = dataclasses.replace(ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep])
    n, batch = len(ds.train_images), 32
    per_epoch = -(-n // batch)  # the partial last batch kept, as both fit loops keep it
    correct = {"resnet_jax": 0.0, "keras": 0.0}
    data_key = jax.random.key(a.seed + 1)
    xt = ds.test_images.astype(np.float32) / 255 - mean

    def distance():
        worst_stat, worst_param = 0.0, 0.0
        for path, layer in zip(norms, knorms):
            gamma, beta, moving_mean, moving_var = layer.get_weights()
            ours = get(state.batch_stats, path)
            for a_, b_ in ((ours["mean"], moving_mean), (ours["var"], moving_var)):
                worst_stat = max(worst_stat, float(np.max(np.abs(np.asarray(a_) - b_) / (np.abs(b_) + 1e-3))))
        for path, layer in zip(convs, kconvs):
            k = layer.get_weights()[0]
            worst_param = max(
                worst_param,
                float(np.max(np.abs(np.asarray(get(state.params, path)["kernel"]) - k)) / np.max(np.abs(k))),
            )
        return worst_stat, worst_param

    def accuracy_ours():
        correct = 0
        for i in range(0, len(xt), 1000):
            logits = steps.logits_of(state, xt[i : i + 1000])
            correct += int(np.sum(np.argmax(np.asarray(logits), -1) == ds.test_labels[i : i + 1000]))
        return correct / len(xt)

    for i in range(a.steps):
        if i % per_epoch == 0:
            order = rng.permutation(n)  # a fresh order each epoch
            correct = dict.fromkeys(correct, 0.0)
        idx = order[(i % per_epoch) * batch : (i % per_epoch + 1) * batch]
        x = ds.train_images[idx].astype(np.float32) / 255 - mean
        x = np.asarray(rj.model.augment.augment(jax.random.fold_in(data_key, i), x, config))
        y = ds.train_labels[idx]
        kmodel.reset_metrics()  # Keras 3's train_on_batch returns running means otherwise
        keras_out = kmodel.train_on_batch(x, y, return_dict=True)
        keras_loss = keras_out["loss"]
        state, m = step(state, x, y)
        correct["keras"] += float(keras_out["accuracy"]) * len(idx)
        correct["resnet_jax"] += float(m["correct"])
        if (i + 1) % per_epoch == 0:  # an epoch's training accuracy on the shared stream, and test
            _, keras_acc = kmodel.evaluate(xt, ds.test_labels, batch_size=1000, verbose=0)
            line = {"epoch": (i + 1) // per_epoch, "step": i + 1}
            line |= {f"acc_{k}": round(v / n, 5) for k, v in correct.items()}
            line |= {"test_acc_resnet_jax": accuracy_ours(), "test_acc_keras": round(keras_acc, 4)}
            print(json.dumps(line), flush=True)
        if (i + 1) % a.every == 0 or i + 1 == a.steps:
            stat, param = distance()
            print(
                json.dumps(
                    {
                        "step": i + 1,
                        "loss_resnet_jax": round(float(m["loss"] / m["count"]), 5),
                        "loss_keras": round(float(keras_loss), 5),
                        "moving_stats_max_rel_diff": round(stat, 6),
                        "conv_kernels_max_rel_diff": round(param, 6),
                    }
                ),
                flush=True,
            )
    _, keras_acc = kmodel.evaluate(xt, ds.test_labels, batch_size=1000, verbose=0)
    print(
        json.dumps(
            {"step": a.steps, "test_acc_resnet_jax": accuracy_ours(), "test_acc_keras": round(keras_acc, 4)}
        )
    )


if __name__ == "__main__":
    main()
