"""Run by test_open.py in a fresh process (so it can be SIGKILLed): train_and_evaluate with a
BatchNorm-free CNN and SGD on a cosine schedule, on fixed random 28x28x1 data.

    python own_run.py WORKDIR EPOCHS
"""

import functools
import sys

from conftest import random_dataset
from own_parts import CNN, sgd_cosine

import resnet_jax as rj

workdir, epochs = sys.argv[1], int(sys.argv[2])
dataset = random_dataset(n_train=96, n_test=32, shape=(28, 28, 1))
config = rj.preset("tiny", batch_size=16, epochs=epochs, steps_per_call=2)
rj.train_and_evaluate(
    config, workdir, dataset, model=CNN(), optimizer=functools.partial(sgd_cosine, epochs=epochs)
)
