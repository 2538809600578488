"""Any tensorflow-datasets image-classification dataset that fits in memory, as a Dataset.

What qualifies: `supervised_keys` naming an `Image` feature of one fixed size (HxWxC, grayscale as
C=1) and a `ClassLabel`; the `train` split and the `test` split (else `validation`). A prepared
copy under `data_dir` (or TFDS_DATA_DIR) is used as is; otherwise tfds downloads it, and offline
that fails within seconds with one line. TensorFlow is tfds's reader only: it is kept off every
GPU (JAX owns the accelerators).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import socket
import sys
import tempfile

import numpy as np

from resnet_jax.data.dataset import Dataset
from resnet_jax.errors import UserError

# Where tfds downloads from: its own mirror first, then the dataset's site (CIFAR's here).
DOWNLOAD_HOSTS = (("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443))
OFFLINE_HINTS = {
    "cifar10": "the official cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)",
    "cifar100": "the official cifar-100-python.tar.gz (or its extracted cifar-100-python/)",
}


def tensorflow():
    """TensorFlow, kept off every GPU (JAX owns the accelerators) and imported without its
    start-up notices (oneDNN, CPU features, CUDA): its C++ log level is 2 for the import only,
    unless you chose one (JAX's import sets 1), and put back after; what its libraries log while
    they load, before that level applies, is filtered (`_start_up_quiet`)."""
    saved = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if saved in (None, "1"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    try:
        with _start_up_quiet():
            import tensorflow as tf
    finally:
        if saved is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = saved
    tf.config.set_visible_devices([], "GPU")
    return tf


def _tfds():
    """tensorflow_datasets, TensorFlow imported first as `tensorflow` does."""
    tensorflow()
    import tensorflow_datasets as tfds

    return tfds


# TensorFlow's two shared libraries each log "oneDNN custom operations are on" (on CPUs with
# AVX-512-class features, or TF_ENABLE_ONEDNN_OPTS=1) from a static initializer, as they load:
# absl's logging is not initialised yet, so TF_CPP_MIN_LOG_LEVEL does not apply and absl writes
# its own preamble first. Lines in absl's INFO/WARNING format, the preamble, and the CPU-feature
# note's second line are dropped; anything else written meanwhile (errors) is written back.
_NOTICE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \S+ +\d+ \S+:\d+\] |"
    r"To enable the following instructions:)"
)


@contextlib.contextmanager
def _start_up_quiet():
    """File descriptor 2 into a temporary file while TensorFlow's libraries load, then what was
    written there back to it, but for TensorFlow's start-up notices (`_NOTICE`)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _NOTICE.match(line))
            if kept:
                os.write(2, kept.encode())


@contextlib.contextmanager
def _no_empty_temporary_folders():
    """tfds.builder of a dataset not prepared here makes a folder `tmp*tfds` in the temporary
    directory for GCS's metadata and, GCS being off, leaves it there empty: the empty ones made
    meanwhile are removed (a folder holding anything is left alone)."""
    where = tempfile.gettempdir()
    listed = lambda: {n for n in os.listdir(where) if n.startswith("tmp") and n.endswith("tfds")}
    before = listed()
    try:
        yield
    finally:
        for name in listed() - before:
            with contextlib.suppress(OSError):  # not empty, or gone already
                os.rmdir(os.path.join(where, name))


def _reachable(address, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(name: str, data_dir, hint: str | None = None) -> UserError:
    if hint is not None:  # data_dir holds an image archive: say to pass it
        return UserError(f"cannot download {name} (no network), and {hint}")
    local = OFFLINE_HINTS.get(
        name, "a folder of images in class subfolders (train/<class>/, test/<class>/) or its .tar.gz"
    )
    if data_dir is not None and os.path.isdir(data_dir) and not os.listdir(data_dir):
        # tfds would have downloaded into it: say what belongs there, briefly
        archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}.get(name)
        what = f"the official {archive}, " if archive else ""
        return UserError(
            f"data_dir {data_dir} is empty and {name} cannot be downloaded offline: put {what}images in "
            "class subfolders, or a tfds data_dir there"
        )
    return UserError(
        f"cannot download {name}: no network and no prepared copy in {data_dir or 'the tfds data dir'}. "
        f"Offline, point data_dir (--data_dir) at {local}, an image-folder archive, or a tfds data_dir "
        f"where {name} was prepared (TFDS_DATA_DIR)"
    )


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def closest_name(name: str, known) -> str | None:
    """The tfds name a mistyped one most likely meant: the same letters and digits (cifar-10,
    CIFAR_10 -> cifar10), else the nearest by spelling; None when nothing is close."""
    known = sorted(known)
    same = [k for k in known if _normal(k) == _normal(name)]
    if same:
        return same[0]
    by_normal = {_normal(k): k for k in known}
    close = difflib.get_close_matches(_normal(name), list(by_normal), n=1, cutoff=0.75)
    return by_normal[close[0]] if close else None


def unknown_dataset(name: str, tfds) -> UserError:
    guess = closest_name(name, tfds.list_builders(with_community_datasets=False))  # no network
    return UserError(
        f"unknown dataset {name!r}: not a tensorflow-datasets name"
        + (f"; did you mean {guess}?" if guess and guess != name else "")
        + " (tfds.list_builders() lists them); for your own images point data_dir (--data_dir) at a "
        "folder in class subfolders, or build a resnet_jax.Dataset from arrays"
    )


def image_and_label(name: str, info) -> tuple[str, str, tuple, int]:
    """(image key, label key, image shape, classes) of a dataset's info, or a UserError saying
    why it is not a fixed-size image-classification dataset."""
    tfds = _tfds()
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
        raise UserError(
            f"{name} is not an image-classification dataset (no (image, label) supervised keys); "
            "resnet_jax trains on images with class labels"
        )
    image, label = info.features[keys[0]], info.features[keys[1]]
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        raise UserError(
            f"{name} is not an image-classification dataset (its {keys[0]!r} is "
            f"{type(image).__name__}, its {keys[1]!r} {type(label).__name__}; resnet_jax needs Image "
            "and ClassLabel)"
        )
    if None in image.shape:
        raise UserError(
            f"{name} has images of varying size {image.shape}; resize them to one size and pass "
            "a resnet_jax.Dataset of arrays (or a folder of images of one size)"
        )
    return keys[0], keys[1], tuple(image.shape), int(label.num_classes)


def _test_split(name: str, splits) -> str:
    if not splits:  # not prepared (or mocked): tfds's usual names
        return "test"
    for candidate in ("test", "validation"):
        if candidate in splits:
            return candidate
    raise UserError(f"{name} has no test or validation split (splits: {', '.join(sorted(splits))})")


def load(name: str, data_dir: str | None = None, fits=None, offline_hint: str | None = None):
    """The dataset `name` from tensorflow-datasets as host arrays.

    `fits(nbytes, what)` is called with the uint8 size of both splits before they are read into
    memory (resnet_jax.data.check_host_memory), when tfds knows the split sizes. `offline_hint` replaces
    the offline advice (data_dir holds an image archive to pass instead)."""
    tfds = _tfds()
    try:
        with _no_empty_temporary_folders():
            builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise unknown_dataset(name, tfds) from None  # also names tfds cannot parse (cifar-10)
    image_key, label_key, shape, classes = image_and_label(name, builder.info)

    def read(download: bool):
        if download:
            builder.download_and_prepare()
        test = _test_split(name, builder.info.splits)
        if fits is not None and builder.info.splits:
            count = builder.info.splits["train"].num_examples + builder.info.splits[test].num_examples
            fits(count * math.prod(shape), f"{name} ({count:,} images of {'x'.join(map(str, shape))})")
        arrays = []
        for split in ("train", test):
            ds = builder.as_dataset(split=split, as_supervised=True)
            # Batch by hand: batch_size=-1 trusts split sizes from metadata, which may be absent.
            parts = list(tfds.as_numpy(ds.batch(4096)))
            arrays += [np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])]
        return Dataset(*arrays, num_classes=classes, source=f"tfds:{name}", name=name)

    try:
        return read(download=False)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - not prepared here: download, but only if the network is there
        if not any(_reachable(host) for host in DOWNLOAD_HOSTS):
            raise _offline_error(name, data_dir, offline_hint) from None
        try:
            return read(download=True)
        except UserError:
            raise
        except AssertionError as e:  # tfds's way of saying a manual download is needed
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else "manual download needed"
            raise UserError(f"tensorflow-datasets cannot prepare {name}: {first}") from None
