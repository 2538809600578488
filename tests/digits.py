"""scikit-learn's digits as a small real dataset: 8x8 upsampled to 32x32x3 uint8."""

import numpy as np

import resnet_jax as rj

# The recipe of the "does it learn" tests: 8 filters, one block per stage, 16 epochs.
DIGITS = rj.Config(
    num_filters=8,
    stage_sizes=(1, 1, 1),
    epochs=16,
    flip=False,
    lr_epochs=(12,),
    lr_factors=(0.1,),
    steps_per_call=45,
)


def digits_dataset(n_test=357, seed=0, scale=4, channels=3):
    """Digits upsampled `scale` times (8x8 -> 32x32 by default, CIFAR's shape; 1: the 8x8 digits
    as they are, for the tests that only need a real dataset to learn), `channels` copies of the
    gray.
    1,440 training images: 45 batches of 32, no partial batch (one program less to compile)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.kron(d.images, np.ones((scale, scale)))  # nearest
    images = np.repeat((images * (255 / 16)).round().astype(np.uint8)[..., None], channels, axis=-1)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:n_test], order[n_test:]
    return rj.Dataset(images[train], d.target[train], images[test], d.target[test], num_classes=10)
