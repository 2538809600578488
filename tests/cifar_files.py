"""Small CIFAR archives in the official python layout, written by the tests."""

import numpy as np

import resnet_jax as rj


def make_images(n, seed, classes):
    """NHWC uint8 images whose pixels encode (image, row, col, channel), plus labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, :] = [1, 2, 3]  # a fixed corner: channel order visible
    return images, rng.integers(0, classes, n).astype(np.int64)


def write_cifar(
    root, name="cifar10", rows=(20, 20, 20, 20, 20), test_rows=30, seed=0, tar=True, bytes_keys=True
):
    """Write a small archive (tar.gz, or extracted folder) under `root`; return (path, arrays)."""
    classes = 100 if name == "cifar100" else 10
    rows = rows[: 1 if name == "cifar100" else 5]
    train = [make_images(n, seed + i, classes) for i, n in enumerate(rows)]
    xt, yt = make_images(test_rows, seed + 100, classes)
    arrays = (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), xt, yt)
    dataset = rj.Dataset(*arrays, num_classes=classes)
    path = rj.data.cifar_archive.write_archive(
        str(root), dataset, name, tar=tar, rows=rows, bytes_keys=bytes_keys
    )
    return path, arrays
