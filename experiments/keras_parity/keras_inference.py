"""resnet_jax's forward pass against Keras 3's in both BatchNorm modes, from the same variables:
every weight of the seed model (width --num_filters) moved off its initial value, the conv biases
non-zero, the moving means and variances random, copied into resnet_jax's ResNet; prints the
largest difference of the class probabilities in inference mode (moving statistics) and in
training mode (batch statistics). Issue 22: whether resnet_jax *uses* the moving statistics as
Keras does (keras_parity.py checks how they are kept).

    KERAS_BACKEND=jax python experiments/keras_parity/keras_inference.py [--num_filters 8]
"""

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)  # what the benchmarks share: keras_baseline, common, jsonl, hlo_text

import argparse
import json

os.environ.setdefault("KERAS_BACKEND", "jax")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num_filters", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import jax
    import keras
    import numpy as np
    from keras_baseline import build
    from keras_parity import copy_weights

    import resnet_jax as rj
    from resnet_jax.model import optim, resnet, steps

    config = rj.Config(num_filters=a.num_filters)
    keras.utils.set_random_seed(a.seed)
    kmodel = build(keras, config.num_filters, config.stage_sizes, 10)
    rng = np.random.default_rng(a.seed)
    for layer in kmodel.layers:
        weights = [w + 0.05 * rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()]
        if type(layer).__name__ == "BatchNormalization":
            weights[3] = rng.uniform(0.2, 3.0, size=weights[3].shape).astype(np.float32)
        layer.set_weights(weights)
    model = resnet.from_config(config, materialize=False)
    tx = optim.make_optimizer(config, 1563)
    state = copy_weights(kmodel, steps.init_state(model, tx, config, jax.random.key(a.seed), (32, 32, 3)))
    x = 0.3 * rng.normal(size=(64, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(jax.nn.softmax(steps.logits_of(state, x)))
    theirs = np.asarray(kmodel(x, training=False))
    logits, _ = state.apply_fn(state.variables(), x, train=True, mutable=["batch_stats"])
    trained = np.abs(np.asarray(jax.nn.softmax(logits)) - np.asarray(kmodel(x, training=True))).max()
    print(
        json.dumps(
            {
                "inference_probs_max_abs_diff": float(np.abs(ours - theirs).max()),
                "inference_argmax_agree": float((ours.argmax(1) == theirs.argmax(1)).mean()),
                "mean_top_probability": round(float(ours.max(1).mean()), 4),
                "training_probs_max_abs_diff": float(trained),
                "backend": keras.backend.backend(),
            }
        )
    )


if __name__ == "__main__":
    main()
