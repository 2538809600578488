"""The seed recipe rebuilt in Keras 3 (`fit` on keras-preprocessing's ImageDataGenerator, as the
seed run did), trained on real images; one JSON line per epoch (benchmarks/real_curve.py runs it).

    pip install -e ".[bench]"
    python benchmarks/keras_real.py --data_dir ../shared/data/cifar10-jpeg75.tar.gz --epochs 2 --seed 0

The images come through resnet_jax's loader (the same uint8 arrays resnet_jax trains on); the rest
is Keras: per-pixel mean subtraction, shift 0.1 + flip (nearest fill), Adam(1e-3, epsilon 1e-7),
the log's learning-rate steps, batch 32 with the partial batch kept, the test set as validation.
"""

import argparse
import json
import os
import time

from resnet_jax.cli import comma_list

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", required=True, help="as train.py's --data_dir (an image folder or archive)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="tensorflow", help="KERAS_BACKEND: tensorflow or jax")
    p.add_argument("--lr_epochs", type=comma_list(int), default=(26, 36, 46), help="as train.py's")
    p.add_argument("--lr_factors", type=comma_list(float), default=(0.1, 0.01, 0.5), help="as train.py's")
    p.add_argument("--num_filters", type=int, default=32, help="the stem's width (seed: 32)")
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (a quick check)")
    a = p.parse_args()
    import resnet_jax as rj

    try:  # the rate steps as train.py takes them: a Config refuses what train.py refuses
        steps = rj.Config(lr_epochs=a.lr_epochs, lr_factors=a.lr_factors)
    except rj.UserError as e:
        p.error(str(e))
    os.environ["KERAS_BACKEND"] = a.backend
    import keras
    import numpy as np
    from keras_baseline import batches, build
    from keras_preprocessing.image import ImageDataGenerator

    ds = rj.load_dataset("cifar10", data_dir=a.data_dir)
    mean = rj.data.dataset.pixel_mean(ds.train_images)
    n = a.limit or len(ds.train_images)
    x, y = ds.train_images[:n].astype(np.float32) / 255 - mean, ds.train_labels[:n]
    xt = ds.test_images.astype(np.float32) / 255 - mean
    keras.utils.set_random_seed(a.seed)
    model = build(keras, a.num_filters, (3, 3, 2), ds.num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    gen = ImageDataGenerator(
        width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True, fill_mode="nearest"
    )
    side = f"keras {keras.__version__} ({keras.backend.backend()})"

    class EpochLines(keras.callbacks.Callback):
        """One JSON line as each epoch ends (a run cut short still reports its epochs)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            line = {"side": side, "seed": a.seed, "epoch": epoch + 1, "acc": logs["accuracy"]}
            line |= {"val_acc": logs["val_accuracy"], "loss": logs["loss"], "val_loss": logs["val_loss"]}
            print(json.dumps(line | {"seconds": round(time.perf_counter() - self.start, 1)}), flush=True)

    flow = gen.flow(x, y, batch_size=32, seed=a.seed)
    model.fit(
        batches(flow),
        steps_per_epoch=len(flow),
        epochs=a.epochs,
        validation_data=(xt, ds.test_labels),
        callbacks=[
            EpochLines(),
            # resnet_jax's own optax schedule by epoch, so both sides step alike
            keras.callbacks.LearningRateScheduler(lambda e: rj.model.optim.lr_for_epoch(steps, e + 1)),
        ],
        verbose=0,
    )


if __name__ == "__main__":
    main()
