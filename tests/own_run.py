"""Run by test_open.py in a fresh process (so it can be SIGKILLed): train_and_evaluate with a
BatchNorm-free CNN and SGD on a cosine schedule, on fixed random 28x28x1 data.

    python own_run.py WORKDIR EPOCHS
"""

import functools
import sys

import numpy as np
from own_parts import CNN, sgd_cosine

import resnet_jax as rj

workdir, epochs = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
dataset = rj.Dataset(
    rng.integers(0, 256, (96, 28, 28, 1), dtype=np.uint8),
    rng.integers(0, 10, 96),
    rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8),
    rng.integers(0, 10, 32),
    num_classes=10,
)
config = rj.preset("tiny", batch_size=16, epochs=epochs, steps_per_call=2)
rj.train_and_evaluate(
    config, workdir, dataset, model=CNN(), optimizer=functools.partial(sgd_cosine, epochs=epochs)
)
