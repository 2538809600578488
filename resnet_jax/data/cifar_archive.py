"""CIFAR-10/100 in the official python layout (`cifar-10-python.tar.gz`, its extracted folder):
read offline with a restricted unpickler, and written from arrays (`write_archive`) so tests and
benchmarks can make CIFAR-shaped data without a network."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence

import numpy as np

from resnet_jax.data.dataset import Dataset
from resnet_jax.errors import UserError

# name -> (archive file, extracted folder, train files, test files, label key)
ARCHIVES = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def find_archive(name: str, path: str) -> str | None:
    """The archive or extracted folder for `name` at or directly under `path`, if any."""
    archive, folder, train_files, _, _ = ARCHIVES[name]
    other = [a for n, a in ARCHIVES.items() if n != name]
    if os.path.isfile(path):
        if any(os.path.basename(path) == a[0] for a in other):
            raise UserError(f"{path} is the archive of another dataset; pass --dataset to match it")
        if not path.endswith((".tar.gz", ".tgz", ".tar")) and not tarfile.is_tarfile(path):
            raise UserError(
                f"{path} is a file but not an archive (tar or tar.gz); point data_dir (--data_dir) at "
                "a folder of images in class subfolders, its .tar.gz, or the official CIFAR archive"
            )
        return path
    if os.path.exists(os.path.join(path, train_files[0])):
        return path
    for candidate in (os.path.join(path, folder), os.path.join(path, archive)):
        if os.path.exists(candidate):
            return candidate
    for a in other:
        if os.path.exists(os.path.join(path, a[0])) or os.path.exists(os.path.join(path, a[1])):
            raise UserError(f"{path} holds {a[1]} but the dataset is {name}; pass the matching --dataset")
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts and nothing that could run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")


def _parse_batch(raw: bytes, label_key: str, where: str):
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means: not a CIFAR batch
        raise UserError(f"{where} is not a CIFAR batch file ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{where} does not hold a CIFAR batch dict (got {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise UserError(
            f"{where} lacks the 'data' and '{label_key}' entries of a CIFAR batch (has {sorted(batch)})"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{where}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise UserError(f"{where}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _read_members(path: str, names) -> dict:
    """Raw bytes of the named batch files, from a tar.gz or a folder."""
    out = {}
    if os.path.isdir(path):
        for n in names:
            p = os.path.join(path, n)
            if os.path.exists(p):
                with open(p, "rb") as f:
                    out[n] = f.read()
        return out
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in names:
                    out[base] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        reason = str(e).splitlines()[0].rstrip(":")
        raise UserError(
            f"{path} is truncated or not a CIFAR tar.gz archive ({reason}); download it again"
        ) from None
    return out


def read_archive(name: str, path: str):
    """Read an official CIFAR python archive (tar.gz) or its extracted folder; no network."""
    _, _, train_files, test_files, label_key = ARCHIVES[name]
    raw = _read_members(path, set(train_files + test_files))
    missing = [n for n in [train_files[0]] + test_files if n not in raw]
    if missing:
        raise UserError(f"{path} is not a complete {name} archive: missing {', '.join(missing)}")
    split = lambda files: [_parse_batch(raw[n], label_key, f"{path}:{n}") for n in files if n in raw]
    train, test = split(train_files), split(test_files)
    return Dataset(
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        np.concatenate([x for x, _ in test]),
        np.concatenate([y for _, y in test]),
        num_classes=100 if name == "cifar100" else 10,
        source=f"archive:{os.path.abspath(path)}",
        name=name,
    )


def write_archive(
    root: str,
    dataset,
    name: str = "cifar10",
    tar: bool = True,
    rows: Sequence[int] | None = None,
    bytes_keys: bool = True,
) -> str:
    """Write `dataset` under `root` in the official CIFAR python layout; returns its path.

    The inverse of `read_archive`: a tar.gz (or, with tar=False, the extracted folder) holding
    pickled batch dicts of channel-major uint8 rows, as the official download does. `rows`
    splits the training images over the first len(rows) training files (default: all, evenly);
    `bytes_keys` pickles the dict keys as bytes, as the official Python 2 files do. Lets tests
    and benchmarks make CIFAR-shaped data offline.
    """
    archive, folder, train_files, test_files, label_key = ARCHIVES[name]
    if dataset.image_shape != (32, 32, 3):
        raise UserError(f"the CIFAR layout holds 32x32x3 images, got {dataset.image_shape}")
    n = len(dataset.train_images)
    if rows is None:
        rows = [n // len(train_files) + (i < n % len(train_files)) for i in range(len(train_files))]
    if not 0 < len(rows) <= len(train_files) or sum(rows) != n:
        raise UserError(f"rows must split the {n} training images over {len(train_files)} files")
    ends = np.cumsum([0] + list(rows))
    parts = [
        (f, dataset.train_images[a:b], dataset.train_labels[a:b])
        for f, a, b in zip(train_files, ends[:-1], ends[1:])
    ]
    parts.append((test_files[0], dataset.test_images, dataset.test_labels))

    def pickled(images, labels):
        d = {
            "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
            label_key: labels.astype(np.int64).tolist(),
            "batch_label": "resnet_jax",
        }
        return pickle.dumps({k.encode(): v for k, v in d.items()} if bytes_keys else d, protocol=2)

    os.makedirs(root, exist_ok=True)
    if not tar:
        path = os.path.join(root, folder)
        os.makedirs(path, exist_ok=True)
        for fname, images, labels in parts:
            with open(os.path.join(path, fname), "wb") as f:
                f.write(pickled(images, labels))
        return path
    path = os.path.join(root, archive)
    with tarfile.open(path, "w:gz") as t:
        for fname, images, labels in parts:
            raw = pickled(images, labels)
            info = tarfile.TarInfo(f"{folder}/{fname}")
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))
    return path
