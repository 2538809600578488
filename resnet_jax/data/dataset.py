"""The `Dataset` type every source returns: uint8 NHWC images and integer labels on the host,
train and test splits; and what is computed from one (the per-pixel mean, a held-out split).

A leaf module: the sources (`tfds_data`, `cifar_archive`, `image_folder`) import it, and
`data.load_dataset` picks among them."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from resnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """uint8 NHWC images and integer labels; build one from your own arrays to train on them.

    Fields: `train_images` / `test_images` (uint8, N x H x W x C), `train_labels` / `test_labels`
    (int, N), `num_classes`, `source` (arrays, tfds:<name>, archive:<path> or folder:<path>),
    `name` (what a run records as its dataset), `class_names` (by label, when known) and
    `test_split` (how a folder without a test split got one: its fraction, count and seed).
    `subset(train, test)` takes a seeded random sample of each split, in random order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int | None = None  # None: 1 + the largest label
    source: str = "arrays"  # where the data came from: arrays, tfds:<name>, archive:<path>, folder:<path>
    name: str = "arrays"  # what a run records as its dataset: a tfds name, `folder` or `arrays`
    class_names: tuple[str, ...] | None = None  # by label, when the source names them
    test_split: dict | None = None  # how the test split was held out of a folder without one

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

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> Dataset:
        """A seeded random sample of `train` training and `test` test images (None: all of a split),
        in random order: a quick look at a large dataset, with every class mixed in (image folders
        list their images class by class)."""
        rng = np.random.default_rng(seed)

        def pick(images, labels, n, split):
            if n is None:
                return images, labels
            if not 0 < n <= len(images):
                raise UserError(f"subset: {split} must be between 1 and {len(images)}, got {n}")
            idx = rng.permutation(len(images))[:n]
            return images[idx], labels[idx]

        xtr, ytr = pick(self.train_images, self.train_labels, train, "train")
        xte, yte = pick(self.test_images, self.test_labels, test, "test")
        return dataclasses.replace(self, train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte)

    def save(self, path: str) -> None:
        """The dataset as one .npz file (its arrays and what describes them), read back by
        `Dataset.load` or load_dataset(data_dir=path)."""
        import json

        meta = {k: getattr(self, k) for k in ("num_classes", "source", "name", "class_names", "test_split")}
        arrays = {k: getattr(self, k) for k in ("train_images", "train_labels", "test_images", "test_labels")}
        np.savez(path, **arrays, meta=np.asarray(json.dumps(meta)))

    @classmethod
    def load(cls, path: str) -> Dataset:
        """A dataset written by `save`."""
        import json

        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays.pop("meta")))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path} is not a dataset written by resnet_jax.Dataset.save ({e})") from None
        if meta.get("class_names") is not None:
            meta["class_names"] = tuple(meta["class_names"])
        return cls(**arrays, **meta)

    def fingerprint(self) -> str:
        """A short hash of every image and label (blake2b): the same data, the same string."""
        h = hashlib.blake2b(digest_size=8)
        for a in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()

    def describe(self) -> dict:
        """What run.json records of the data a run trained on."""
        described = {
            "source": self.source,
            "train": len(self.train_images),
            "test": len(self.test_images),
            "image_shape": list(self.image_shape),
            "classes": self.num_classes,
            "fingerprint": self.fingerprint(),
        }
        if self.test_split is not None:
            described["test_split"] = dict(self.test_split)
        return described


def dataset_fields(dataset: Dataset) -> dict:
    """The Config fields a run takes from its data: the dataset's name, its classes and their names."""
    names = tuple(str(n) for n in dataset.class_names) if dataset.class_names else ()
    return {"dataset": dataset.name, "num_classes": dataset.num_classes, "class_names": names}


def check_fits_model(dataset: Dataset, config, image_shape, what: str = "the model"):
    """Refuse data a model cannot be evaluated on without a wrong answer: other image shapes,
    another number of classes, or (when both name them) other class names."""
    image_shape = tuple(int(d) for d in image_shape)
    if tuple(dataset.image_shape) != image_shape:
        raise UserError(
            f"{what} takes images of shape {image_shape}, the data's are {tuple(dataset.image_shape)}; "
            "evaluate it on images of its shape"
        )
    if dataset.num_classes != config.num_classes:
        names = f" ({', '.join(map(str, dataset.class_names[:5]))})" if dataset.class_names else ""
        raise UserError(
            f"{what} has {config.num_classes} classes, the data {dataset.num_classes}{names}: its answers "
            f"would be wrong; evaluate it on data of its classes (rj.Dataset(..., num_classes="
            f"{config.num_classes}) when a split lacks some)"
        )
    ours = tuple(config.class_names or ())
    theirs = tuple(str(n) for n in dataset.class_names) if dataset.class_names else ()
    if ours and theirs and ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise UserError(
            f"{what}'s class {first} is {ours[first]!r}, the data's is {theirs[first]!r}: the labels "
            "do not mean the same classes; evaluate it on data of its classes"
        )


def holdout_indices(labels: np.ndarray, val_split: float, seed: int, what: str = "val_split") -> np.ndarray:
    """Sorted indices of a seeded, class-stratified held-out set of `val_split` images (a count,
    or a fraction < 1 of the labels): each class gives its share, largest remainders round."""
    n = len(labels)
    count = int(round(val_split * n)) if val_split < 1 else int(val_split)
    if not 0 < count < n:
        raise UserError(
            f"{what} {val_split:g} asks for {count} of the {n} images; "
            f"hold out between 1 and {n - 1} (a count, or a fraction < 1)"
        )
    classes, sizes = np.unique(labels, return_counts=True)
    share = sizes * count / n
    take = np.floor(share).astype(int)
    take[np.argsort(-(share - take), kind="stable")[: count - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def split_holdout(dataset: Dataset, val_split: float, seed: int) -> tuple[Dataset, np.ndarray]:
    """(a Dataset whose test split is the held-out validation set, the held-out indices)."""
    idx = holdout_indices(dataset.train_labels, val_split, seed)
    keep = np.ones(len(dataset.train_labels), bool)
    keep[idx] = False
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[keep],
        train_labels=dataset.train_labels[keep],
        test_images=dataset.train_images[idx],
        test_labels=dataset.train_labels[idx],
    ), idx


def pixel_mean(images: np.ndarray) -> np.ndarray:
    """Per-pixel mean of uint8 images scaled to [0, 1], float32 (H, W, C)."""
    return (images.mean(axis=0, dtype=np.float64) / 255.0).astype(np.float32)
