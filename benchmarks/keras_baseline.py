"""The original's way, for comparison: the same ResNet in Keras 3, trained with `fit` on
keras-preprocessing's ImageDataGenerator (the seed's augmentation), random CIFAR-shaped data.

    pip install keras keras-preprocessing scipy      # optional; not needed by resnet_jax
    python benchmarks/keras_baseline.py [--batch_size 32] [--num_filters 32] [--stage_sizes 3,3,2]

Prints one JSON line with train_images_per_s (steady state: the fastest epoch after the first).
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(keras, num_filters, stage_sizes, num_classes=10, input_shape=(32, 32, 3)):
    L = keras.layers
    reg = keras.regularizers.l2(1e-4)

    def conv(x, filters, kernel=3, strides=1):
        return L.Conv2D(
            filters,
            kernel,
            strides=strides,
            padding="same",
            kernel_initializer="he_normal",
            kernel_regularizer=reg,
        )(x)

    def bn(x):
        return L.BatchNormalization(momentum=0.99, epsilon=1e-3)(x)

    inputs = keras.Input(input_shape)
    x = L.Activation("relu")(bn(conv(inputs, num_filters)))
    for stage, blocks in enumerate(stage_sizes):
        filters = num_filters * 2**stage
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            y = L.Activation("relu")(bn(conv(x, filters, strides=strides)))
            y = bn(conv(y, filters))
            if strides != 1:
                x = conv(x, filters, kernel=1, strides=strides)
            x = L.Activation("relu")(L.add([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(num_classes, activation="softmax", kernel_initializer="he_normal")(x)
    return keras.Model(inputs, outputs)


def batches(flow):
    """keras-preprocessing's iterator as a plain generator, for Keras 3's `fit` with
    `steps_per_epoch=len(flow)`: the same batches and per-epoch shuffle. Without TensorFlow
    installed the iterator is no Keras `PyDataset` and `fit` refuses it ("Unrecognized data type";
    seen on the H200 machine, 2026-12-04)."""
    while True:
        yield next(flow)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_filters", type=int, default=32)
    p.add_argument("--stage_sizes", default="3,3,2")
    p.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed epochs after a warm-up one; the fastest counts"
    )
    a = p.parse_args()
    import keras
    import numpy as np
    from keras_preprocessing.image import ImageDataGenerator

    stages = tuple(int(s) for s in a.stage_sizes.split(","))
    model = build(keras, a.num_filters, stages)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(0)
    n = a.steps * a.batch_size
    x = rng.random((n, 32, 32, 3), dtype=np.float32) - 0.5
    y = rng.integers(0, 10, (n, 1))
    gen = ImageDataGenerator(
        width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True, fill_mode="nearest"
    )
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(
        batches(gen.flow(x, y, batch_size=a.batch_size)),
        epochs=1 + a.repeats,
        steps_per_epoch=a.steps,
        verbose=0,
        callbacks=[Timer()],
    )
    steady = min(times[1:])
    print(
        json.dumps(
            {
                "framework": f"keras {keras.__version__} ({keras.backend.backend()}) fit + "
                "ImageDataGenerator",
                "batch_size": a.batch_size,
                "model": f"{a.num_filters}x{a.stage_sizes}",
                "params": model.count_params(),
                "train_images_per_s": round(a.steps * a.batch_size / steady, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
