"""A folder of images in class subfolders, or a .tar.gz of one, as a Dataset.

The layout of Keras's `image_dataset_from_directory` and torchvision's `ImageFolder`, with a
train and a test split:

    root/train/<class>/<any name>.jpg|png|...     root/test/<class>/...

(in an archive, `root` may also be one top folder). Classes are the train split's subfolders in
sorted order; the test split may lack a class but not add one. Images are decoded once with
Pillow into uint8 arrays (grayscale as one channel, everything else as RGB) and must all have one
size. The decoded arrays are cached (`cache.py`, keyed by the files' names, sizes and times), so
the next run loads them in a fraction of a second. Archives are read in memory: nothing is
extracted, and a member whose path would leave the archive's folder (`..`, absolute paths) is
refused.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import zlib

import numpy as np

from resnet_jax.data import cache
from resnet_jax.data.dataset import Dataset
from resnet_jax.errors import UserError

SPLITS = ("train", "test")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
CACHE_FORMAT = 1  # bump when the decoding changes


def _is_image(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and base.lower().endswith(EXTENSIONS)


def _split_class(parts) -> tuple[str, str] | None:
    """(split, class) of an image path's parts `[..., split, class, file]`, else None."""
    if len(parts) >= 3 and parts[-3] in SPLITS:
        return parts[-3], parts[-2]
    return None


def is_archive(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".tar.gz", ".tgz", ".tar"))


def looks_like(path: str) -> bool:
    """Whether `path` is an image folder (train/<class>/ subfolders) or an archive of one."""
    if os.path.isdir(path):
        train = os.path.join(path, "train")
        return os.path.isdir(train) and any(os.path.isdir(os.path.join(train, c)) for c in os.listdir(train))
    if is_archive(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    parts = _safe_parts(member.name, path)
                    if member.isfile() and _is_image(member.name) and _split_class(parts):
                        return True
                    if member.isfile() and posixpath.basename(member.name).startswith("data_batch"):
                        return False  # the official CIFAR python layout
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            return False
    return False


def _safe_parts(name: str, archive: str) -> list[str]:
    """A member's path as parts; refuses paths that would leave the archive's folder."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UserError(f"{archive} holds a member with an absolute path ({name}); refusing the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UserError(
            f"{archive} holds a member whose path leaves its folder ({name}); refusing the archive"
        )
    return parts


def _listing(path: str):
    """[(split, class, display name, size, mtime)] of every image file under `path`, sorted."""
    rows = []
    for split in SPLITS:
        top = os.path.join(path, split)
        if not os.path.isdir(top):
            continue
        for cls in sorted(os.listdir(top)):
            folder = os.path.join(top, cls)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if _is_image(name):
                    st = os.stat(os.path.join(folder, name))
                    rows.append((split, cls, f"{split}/{cls}/{name}", st.st_size, st.st_mtime_ns))
    return rows


def _read_folder(path: str):
    """{split: [(class, name, bytes)]} of a folder."""
    out = {s: [] for s in SPLITS}
    for split, cls, name, _, _ in _listing(path):
        with open(os.path.join(path, name), "rb") as f:
            out[split].append((cls, name, f.read()))
    return out


def _read_archive(path: str):
    """{split: [(class, name, bytes)]} of a tar(.gz) archive, read in memory (nothing extracted)."""
    out = {s: [] for s in SPLITS}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = _safe_parts(member.name, path)
                where = _split_class(parts)
                if not member.isfile() or not _is_image(member.name) or where is None:
                    continue
                split, cls = where
                out[split].append((cls, "/".join(parts), tar.extractfile(member).read()))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        reason = str(e).splitlines()[0].rstrip(":") if str(e) else type(e).__name__
        raise UserError(f"{path} is truncated or not a tar archive ({reason}); make it again") from None
    for split in SPLITS:
        out[split].sort(key=lambda row: row[1])
    return out


def _decode(raw: bytes, name: str, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            gray = image.mode in GRAY_MODES
            image = image.convert("L" if gray else "RGB")
            array = np.asarray(image, np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{where}: {name} is not a readable image ({e}); remove or replace it") from None
    return array[..., None] if gray else array


def _arrays(files: dict, where: str, progress=None):
    """(train images, train labels, test images, test labels, class names) from the files;
    `progress(done, total)` is called as they are decoded (about every 1 %)."""
    classes = sorted({cls for cls, _, _ in files["train"]})
    if not classes:
        raise UserError(
            f"{where} holds no images under train/<class>/ (the layout is train/<class>/*.jpg and "
            "test/<class>/*.jpg); point --data_dir at the folder holding train/ and test/"
        )
    if not files["test"]:
        raise UserError(f"{where} has no test/<class>/ images; add a test split beside train/")
    extra = sorted({cls for cls, _, _ in files["test"]} - set(classes))
    if extra:
        raise UserError(f"{where}: test/ has classes that train/ lacks ({', '.join(extra[:5])})")
    index = {c: i for i, c in enumerate(classes)}
    first = None
    out = []
    total, done = len(files["train"]) + len(files["test"]), 0
    every = max(total // 100, 1)
    for split in SPLITS:
        images, labels = [], []
        for cls, name, raw in files[split]:
            if progress is not None and done % every == 0:
                progress(done, total)
            done += 1
            array = _decode(raw, name, where)
            if first is None:
                first = (name, array.shape)
            elif array.shape[:2] != first[1][:2]:
                raise UserError(
                    f"{where}: {name} is {array.shape[1]}x{array.shape[0]} pixels, {first[0]} "
                    f"{first[1][1]}x{first[1][0]}; resize the images to one size first"
                )
            images.append(array)
            labels.append(index[cls])
        out.append(images)
        out.append(np.asarray(labels, np.int32))
    if progress is not None:
        progress(total, total)
    channels = max(a.shape[-1] for a in out[0] + out[2])
    stack = lambda images: np.stack([np.repeat(a, channels // a.shape[-1], -1) for a in images])
    return stack(out[0]), out[1], stack(out[2]), out[3], classes


def _source(path: str) -> dict:
    """What the decoded arrays come from: the folder's image files (names, sizes, times) or the
    archive's size and time; the cache entry is named by it and records it."""
    if os.path.isdir(path):
        listing = _listing(path)
        files = {"count": len(listing), "listing": cache.key(repr(listing))}
    else:
        st = os.stat(path)
        files = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": path, "format": CACHE_FORMAT, **files}


def load(path: str, progress=None):
    """The Dataset of an image folder or its archive (decoded once, then read from the cache);
    `progress(done, total)` follows a decoding: (0, None) before the files are read, then as
    `_arrays` decodes them."""
    path = os.path.abspath(os.path.expanduser(path))
    source = _source(path)
    key = cache.key("image_folder", source)
    arrays = cache.load_arrays("images", key, source)
    if arrays is None:
        if progress is not None:
            progress(0, None)  # before the files are read: their count is not known yet
        files = _read_archive(path) if is_archive(path) else _read_folder(path)
        xtr, ytr, xte, yte, classes = _arrays(files, path, progress)
        arrays = dict(
            train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte, classes=np.asarray(classes)
        )
        cache.save_arrays("images", key, arrays, source)
    classes = tuple(str(c) for c in arrays["classes"])
    return Dataset(
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
        num_classes=len(classes),
        source=f"folder:{path}",
        name="folder",
        class_names=classes,
    )
