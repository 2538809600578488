"""The dataset on the devices: the whole of it as uint8, replicated on every device (airbench's
way: no input pipeline, batches gathered inside jit), the test set padded for exact batched
evaluation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from resnet_jax.data.dataset import Dataset
from resnet_jax.device import parallel


class DeviceData(NamedTuple):
    train_images: jax.Array  # uint8 (N, H, W, C), replicated
    train_labels: jax.Array  # int32 (N,)
    test_images: jax.Array  # uint8 (M', H, W, C), padded to a multiple of the eval batch
    test_labels: jax.Array
    test_weights: jax.Array  # float32 (M',): 1 for real rows, 0 for padding
    pixel_mean: jax.Array  # float32 (H, W, C)


def eval_batch(config, mesh) -> int:
    """The evaluation batch: config.eval_batch_size rounded up to a multiple of the devices."""
    n = mesh.size
    return -(-config.eval_batch_size // n) * n


def to_device(dataset: Dataset, mean: np.ndarray, config, mesh) -> DeviceData:
    """Place the dataset on every device, the test set padded for exact batched evaluation."""
    train = parallel.replicate((dataset.train_images, dataset.train_labels), mesh)
    return DeviceData(
        *train,
        *eval_set(dataset.test_images, dataset.test_labels, config, mesh),
        parallel.replicate(np.asarray(mean, np.float32), mesh),
    )


def for_evaluation(dataset: Dataset, mean: np.ndarray, config, mesh) -> DeviceData:
    """Only the test set on the devices (the training images left out): what evaluation needs."""
    images, labels, weights = eval_set(dataset.test_images, dataset.test_labels, config, mesh)
    mean = parallel.replicate(np.asarray(mean, np.float32), mesh)
    return DeviceData(images[:0], labels[:0], images, labels, weights, mean)


def device_bytes(dataset: Dataset, config, mesh) -> int:
    """Bytes the dataset takes on each device (`to_device`): uint8 images, the test set padded,
    int32 labels, float32 weights and the float32 pixel mean."""
    pixels = int(np.prod(dataset.image_shape))
    test = len(dataset.test_images) + (-len(dataset.test_images) % eval_batch(config, mesh))
    return len(dataset.train_images) * (pixels + 4) + test * (pixels + 8) + 4 * pixels


def eval_set(images, labels, config, mesh):
    """(images, labels, weights) on every device, padded to whole evaluation batches (weight 0)."""
    b = eval_batch(config, mesh)
    m, pad = len(images), -len(images) % b
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    weights = np.concatenate([np.ones(m, np.float32), np.zeros(pad, np.float32)])
    return parallel.replicate((images, labels, weights), mesh)


def abstract(tree, mesh):
    """The shapes and dtypes of `tree`'s arrays, replicated over `mesh`: what a program compiles
    for before the arrays exist (as `parallel.replicate` will place them)."""
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
