"""Datasets as host arrays: tfds, the official CIFAR archives (offline), or the user's own arrays."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import socket
import tarfile
import zlib
from collections.abc import Sequence

import numpy as np

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
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)  # where tfds fetches CIFAR from


@dataclasses.dataclass(frozen=True)
class Dataset:
    """uint8 NHWC images and integer labels; build one from your own arrays to train on them."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int | None = None  # None: 1 + the largest label
    source: str = "arrays"  # where the data came from: arrays, tfds:<name>, archive:<path>

    def __post_init__(self):
        for split in ("train", "test"):
            images = np.asarray(getattr(self, f"{split}_images"))
            labels = np.asarray(getattr(self, f"{split}_labels"))
            if images.dtype != np.uint8:
                raise UserError(
                    f"{split}_images must be uint8 (0-255), got {images.dtype}; "
                    "convert with np.uint8 (floats in [0, 1]: multiply by 255 first)"
                )
            if images.ndim != 4:
                raise UserError(
                    f"{split}_images must be (N, H, W, C), got shape {images.shape}; "
                    "add a channel axis with images[..., None]"
                )
            if images.shape[1] in (1, 3, 4) and images.shape[3] > 4:
                raise UserError(
                    f"{split}_images look channels-first {images.shape} (N, C, H, W); resnet_jax "
                    f"takes (N, H, W, C): pass np.transpose({split}_images, (0, 2, 3, 1))"
                )
            if labels.ndim != 1 or len(labels) != len(images):
                raise UserError(
                    f"{split}_labels must be ({len(images)},) to match {split}_images, "
                    f"got shape {labels.shape}"
                )
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise UserError(f"{split}_labels must be integers, got {labels.dtype}")
            if len(images) == 0:
                raise UserError(f"{split}_images is empty")
            object.__setattr__(self, f"{split}_images", images)
            object.__setattr__(self, f"{split}_labels", labels.astype(np.int32))
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise UserError(
                f"train and test images differ in shape: {self.train_images.shape[1:]} "
                f"vs {self.test_images.shape[1:]}"
            )
        top = int(max(self.train_labels.max(), self.test_labels.max()))
        low = int(min(self.train_labels.min(), self.test_labels.min()))
        num_classes = self.num_classes if self.num_classes is not None else top + 1
        if low < 0 or top >= num_classes:
            raise UserError(f"labels must be in [0, {num_classes}), found {low}..{top}")
        object.__setattr__(self, "num_classes", int(num_classes))

    @property
    def image_shape(self):
        return self.train_images.shape[1:]

    def fingerprint(self) -> str:
        """A short hash of every image and label (blake2b): the same data, the same string."""
        h = hashlib.blake2b(digest_size=8)
        for a in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()

    def describe(self) -> dict:
        """What run.json records of the data a run trained on."""
        return {
            "source": self.source,
            "train": len(self.train_images),
            "test": len(self.test_images),
            "image_shape": list(self.image_shape),
            "classes": self.num_classes,
            "fingerprint": self.fingerprint(),
        }


def holdout_indices(labels: np.ndarray, val_split: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified held-out set of `val_split` images (a count,
    or a fraction < 1 of the labels): each class gives its share, largest remainders round."""
    n = len(labels)
    count = int(round(val_split * n)) if val_split < 1 else int(val_split)
    if not 0 < count < n:
        raise UserError(
            f"val_split {val_split:g} asks for {count} of the {n} training images; "
            f"hold out between 1 and {n - 1} (a count, or a fraction < 1)"
        )
    classes, sizes = np.unique(labels, return_counts=True)
    share = sizes * count / n
    take = np.floor(share).astype(int)
    take[np.argsort(-(share - take), kind="stable")[: count - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def split_holdout(dataset: Dataset, val_split: float, seed: int) -> tuple[Dataset, np.ndarray]:
    """(a Dataset whose test split is the held-out validation set, the held-out indices)."""
    idx = holdout_indices(dataset.train_labels, val_split, seed)
    keep = np.ones(len(dataset.train_labels), bool)
    keep[idx] = False
    return Dataset(
        dataset.train_images[keep],
        dataset.train_labels[keep],
        dataset.train_images[idx],
        dataset.train_labels[idx],
        dataset.num_classes,
        dataset.source,
    ), idx


def pixel_mean(images: np.ndarray) -> np.ndarray:
    """Per-pixel mean of uint8 images scaled to [0, 1], float32 (H, W, C)."""
    return (images.mean(axis=0, dtype=np.float64) / 255.0).astype(np.float32)


def load_dataset(name: str = "cifar10", data_dir: str | None = None) -> Dataset:
    """CIFAR-10/100 from an official archive under `data_dir` if there is one, else from tfds."""
    if name not in ARCHIVES:
        raise UserError(
            f"unknown dataset {name!r}; choose one of {', '.join(ARCHIVES)} "
            "or build a resnet_jax.Dataset from your own arrays"
        )
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
        if not os.path.exists(data_dir):
            raise UserError(
                f"data_dir {data_dir} does not exist; point it at {ARCHIVES[name][0]}, "
                f"{ARCHIVES[name][1]}/ or a tfds data directory"
            )
        found = find_archive(name, data_dir)
        if found is not None:
            return read_archive(name, found)
    return load_tfds(name, data_dir)


def find_archive(name: str, path: str) -> str | None:
    """The archive or extracted folder for `name` at or directly under `path`, if any."""
    archive, folder, train_files, _, _ = ARCHIVES[name]
    other = [a for n, a in ARCHIVES.items() if n != name]
    if os.path.isfile(path):
        if any(os.path.basename(path) == a[0] for a in other):
            raise UserError(f"{path} is the archive of another dataset; pass --dataset to match it")
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


def read_archive(name: str, path: str) -> Dataset:
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
    )


def write_archive(
    root: str,
    dataset: Dataset,
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


def _offline_error(name: str, data_dir) -> UserError:
    archive, folder = ARCHIVES[name][:2]
    return UserError(
        f"cannot download {name}: no network and no prepared copy in {data_dir or 'the tfds data dir'}. "
        f"Offline, either pass --data_dir pointing at the official {archive} (or its extracted "
        f"{folder}/), or at a tfds data_dir where {name} was prepared (TFDS_DATA_DIR)"
    )


def _reachable(address, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def _tfds():
    """tensorflow_datasets with TensorFlow kept off every GPU (JAX owns the accelerators)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    return tfds


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """CIFAR through tensorflow-datasets: uses a prepared copy, else downloads (quick fail offline)."""
    tfds = _tfds()

    def load(download: bool):
        splits = tfds.load(
            name, split=["train", "test"], as_supervised=True, data_dir=data_dir, download=download
        )
        # Batch by hand: batch_size=-1 trusts split sizes from metadata, which may be absent.
        arrays = []
        for ds in splits:
            parts = list(tfds.as_numpy(ds.batch(4096)))
            arrays += [np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])]
        return Dataset(*arrays, num_classes=100 if name == "cifar100" else 10, source=f"tfds:{name}")

    try:
        return load(download=False)
    except UserError:
        raise
    except Exception:  # not prepared here: download, but only if the network is there
        if not _reachable(DOWNLOAD_HOST):
            raise _offline_error(name, data_dir) from None
        return load(download=True)
