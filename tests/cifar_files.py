"""Small CIFAR archives in the official python layout, written by the tests."""

import io
import os
import pickle
import tarfile

import numpy as np

LAYOUT = {  # name -> (archive, folder, train files, test files, label key)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def make_images(n, seed, classes):
    """NHWC uint8 images whose pixels encode (image, row, col, channel), plus labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, :] = [1, 2, 3]  # a fixed corner: channel order visible
    return images, rng.integers(0, classes, n).astype(np.int64)


def batch_bytes(images, labels, label_key, bytes_keys=True):
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # channel-major rows
    d = {"data": data, label_key: labels.tolist(), "batch_label": "testing"}
    if bytes_keys:  # the official files were pickled by Python 2: keys are bytes
        d = {k.encode(): v for k, v in d.items()}
    return pickle.dumps(d, protocol=2)


def write_cifar(root, name="cifar10", rows=(20, 20, 20, 20, 20), test_rows=30, seed=0,
                tar=True, bytes_keys=True):
    """Write a small archive (tar.gz, or extracted folder) under `root`; return (path, arrays)."""
    archive, folder, train_files, test_files, key = LAYOUT[name]
    classes = 100 if name == "cifar100" else 10
    rows = rows[: len(train_files)]
    files, train = {}, []
    for i, (fname, n) in enumerate(zip(train_files, rows)):
        x, y = make_images(n, seed + i, classes)
        files[fname] = batch_bytes(x, y, key, bytes_keys)
        train.append((x, y))
    xt, yt = make_images(test_rows, seed + 100, classes)
    files[test_files[0]] = batch_bytes(xt, yt, key, bytes_keys)
    arrays = (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), xt, yt)
    os.makedirs(root, exist_ok=True)
    if tar:
        path = os.path.join(root, archive)
        with tarfile.open(path, "w:gz") as t:
            for fname, raw in files.items():
                info = tarfile.TarInfo(f"{folder}/{fname}")
                info.size = len(raw)
                t.addfile(info, io.BytesIO(raw))
    else:
        path = os.path.join(root, folder)
        os.makedirs(path, exist_ok=True)
        for fname, raw in files.items():
            with open(os.path.join(path, fname), "wb") as f:
                f.write(raw)
    return path, arrays
