"""Where a Dataset comes from: `load_dataset` picks the source for a name and a `data_dir`.

- a folder of images in class subfolders, or its .tar.gz (`image_folder.py`);
- the official CIFAR-10/100 python archive or its folder, offline (`cifar_archive.py`);
- any tensorflow-datasets image-classification dataset (`tfds_data.py`);
- or your own arrays: build a `Dataset` (`dataset.py`) and pass it instead.
"""

from __future__ import annotations

import os

from resnet_jax.data import cifar_archive, image_folder, tfds_data
from resnet_jax.data.cache import DecodeProgress
from resnet_jax.data.dataset import Dataset
from resnet_jax.errors import UserError


def load_dataset(
    name: str = "cifar10",
    data_dir: str | None = None,
    *,
    verbose: bool = True,
    test_split: float = 0.2,
    image_size=None,
) -> Dataset:
    """A dataset as host arrays, from what `data_dir` holds, else from tensorflow-datasets.

    `data_dir` may be a folder of images in class subfolders (train/<class>/*, test/<class>/*)
    or a .tar.gz of one (then `name` is not used), the official CIFAR python archive or its
    folder (for cifar10 / cifar100), a tfds data directory, or a .npz of `Dataset.save`. `name` is any tfds
    image-classification dataset that fits in memory (cifar10, mnist, fashion_mnist, svhn_cropped,
    ...). `verbose`: say so (with a progress bar on a terminal) while images are decoded into
    the cache, which happens once per folder or archive. A folder of class subfolders without
    train/ and test/ gets `test_split` of its images held out as the test set (a fraction, or
    a count; seeded, stratified); `image_size` (H, W) resizes an image folder's images."""
    hint = None
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
        if not os.path.exists(data_dir):
            archives = cifar_archive.ARCHIVES
            where = f"{archives[name][0]}, {archives[name][1]}/, " if name in archives else ""
            raise UserError(
                f"data_dir {data_dir} does not exist; point data_dir (--data_dir) at {where}a folder "
                "of images in class subfolders (train/<class>/, test/<class>/, or <class>/ alone), its "
                ".tar.gz, or a tfds data directory"
            )
        if data_dir.endswith(".npz") and os.path.isfile(data_dir):
            return Dataset.load(data_dir)
        if image_folder.looks_like(data_dir):
            progress = DecodeProgress(data_dir) if verbose else None
            return image_folder.load(data_dir, progress, test_split=test_split, image_size=image_size)
        found = cifar_archive.find_archive(name, data_dir) if name in cifar_archive.ARCHIVES else None
        if found is not None:
            return cifar_archive.read_archive(name, found)
        hint = _archive_hint(data_dir)
    return tfds_data.load(name, data_dir, fits=check_host_memory, offline_hint=hint)


def _archive_hint(folder: str) -> str | None:
    """What to pass instead when `folder` holds an image-folder archive but is none itself."""
    if not os.path.isdir(folder):
        return None
    found = sorted(
        os.path.join(folder, n)
        for n in os.listdir(folder)
        if image_folder.is_archive(os.path.join(folder, n))
        and image_folder.looks_like(os.path.join(folder, n))
    )
    if not found:
        return None
    return (
        f"{folder} is a folder holding the image archive {found[0]}: pass the archive itself as "
        f"data_dir (--data_dir {found[0]})"
    )


def for_config(config, data_dir=None, verbose: bool = True) -> Dataset:
    """The dataset a Config names (its dataset, data_dir, test_split and image_size)."""
    return load_dataset(
        config.dataset,
        config.data_dir if data_dir is None else data_dir,
        verbose=verbose,
        test_split=config.test_split,
        image_size=config.image_size or None,
    )


def check_host_memory(nbytes: int, what: str):
    """Refuse data that cannot fit in this machine's available memory, before reading it."""
    from resnet_jax import errors

    errors.check_fits(nbytes, what, errors.host_memory(), "this machine's available memory")
