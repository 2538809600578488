"""A folder of images in class subfolders, or a .tar.gz of one, as a Dataset.

The layout of Keras's `image_dataset_from_directory` and torchvision's `ImageFolder`, with a
train and a test split, or without (then `test_split` of the images are held out as the test
set: seeded with 0 whatever the run's seed, so every run of a sweep tests on the same images,
and stratified by class):

    root/train/<class>/<any name>.jpg|png|...     root/test/<class>/...
    root/<class>/<any name>.jpg|png|...

(in an archive, `root` may also be one top folder). Classes are the train split's subfolders in
sorted order; the test split may lack a class but not add one. Images are decoded once with
Pillow into uint8 arrays (grayscale as one channel, everything else as RGB), resized to
`image_size` (H, W; bilinear, as Keras's) when one is asked, else they must all have one size.
The decoded arrays are cached (`cache.py`, keyed by the files' names, sizes and times and the
image size asked), so the next run loads them in a fraction of a second. Archives are read in
memory: nothing is extracted, and a member whose path would leave the archive's folder (`..`,
absolute paths) is refused.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import zlib

import numpy as np

from resnet_jax.data import cache
from resnet_jax.data.dataset import Dataset, holdout_indices
from resnet_jax.errors import UserError

SPLITS = ("train", "test")
ALL = "all"  # the split of a folder without train/ and test/: every image, a test set held out
TEST_SPLIT_SEED = 0
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
CACHE_FORMAT = 2  # bump when the decoding changes


def _is_image(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and base.lower().endswith(EXTENSIONS)


def _split_class(parts) -> tuple[str, str] | None:
    """(split, class) of an image path's parts `[..., split, class, file]`, ("all", class) of
    `[..., class, file]` (a folder without splits), else None."""
    if len(parts) >= 3 and parts[-3] in SPLITS:
        return parts[-3], parts[-2]
    if len(parts) >= 2:
        return ALL, parts[-2]
    return None


def is_archive(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".tar.gz", ".tgz", ".tar"))


def looks_like(path: str) -> bool:
    """Whether `path` is an image folder (train/<class>/ subfolders, or class subfolders of
    images) or an archive of one."""
    if os.path.isdir(path):
        train = os.path.join(path, "train")
        if os.path.isdir(train):
            return any(os.path.isdir(os.path.join(train, c)) for c in os.listdir(train))
        return bool(_flat_classes(path))
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


def _flat_classes(path: str) -> list[str]:
    """The class subfolders of a folder without train/ and test/: those holding images."""
    found = []
    for name in sorted(os.listdir(path)):
        folder = os.path.join(path, name)
        if name not in SPLITS and os.path.isdir(folder) and any(_is_image(n) for n in os.listdir(folder)):
            found.append(name)
    return found


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
    """[(split, class, display name, size, mtime)] of every image file under `path`, sorted (the
    split "all" for a folder without train/ and test/)."""
    rows = []
    if os.path.isdir(os.path.join(path, "train")):
        tops = [(split, os.path.join(path, split), f"{split}/") for split in SPLITS]
    else:
        tops = [(ALL, path, "")]
    for split, top, prefix in tops:
        if not os.path.isdir(top):
            continue
        for cls in sorted(os.listdir(top)):
            folder = os.path.join(top, cls)
            if not os.path.isdir(folder) or (split == ALL and cls in SPLITS):
                continue
            for name in sorted(os.listdir(folder)):
                if _is_image(name):
                    st = os.stat(os.path.join(folder, name))
                    rows.append((split, cls, f"{prefix}{cls}/{name}", st.st_size, st.st_mtime_ns))
    return rows


def _read_folder(path: str):
    """{split: [(class, name, bytes)]} of a folder."""
    out = {s: [] for s in (*SPLITS, ALL)}
    for split, cls, name, _, _ in _listing(path):
        with open(os.path.join(path, name), "rb") as f:
            out[split].append((cls, name, f.read()))
    return out


def _read_archive(path: str):
    """{split: [(class, name, bytes)]} of a tar(.gz) archive, read in memory (nothing extracted)."""
    out = {s: [] for s in (*SPLITS, ALL)}
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
    if out["train"]:  # split folders: what lies beside them is not a class
        out[ALL] = []
    for split in out:
        out[split].sort(key=lambda row: row[1])
    return out


def _decode(raw: bytes, name: str, where: str, image_size=None) -> np.ndarray:
    """An image as uint8 (H, W, C): grayscale as one channel, else RGB; resized to `image_size`
    (H, W) with bilinear filtering when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            gray = image.mode in GRAY_MODES
            image = image.convert("L" if gray else "RGB")
            if image_size and image.size != (image_size[1], image_size[0]):
                image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
            array = np.asarray(image, np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{where}: {name} is not a readable image ({e}); remove or replace it") from None
    return array[..., None] if gray else array


def _arrays(files: dict, where: str, progress=None, image_size=None) -> dict:
    """The decoded arrays of the files, by split ({split}_images, {split}_labels for train and
    test, or all_images, all_labels for a folder without splits) and `classes`; `progress(done,
    total)` is called as they are decoded (about every 1 %)."""
    flat = not files["train"]
    splits = (ALL,) if flat else SPLITS
    classes = sorted({cls for cls, _, _ in files[splits[0]]})
    if not classes:
        raise UserError(
            f"{where} holds no images in class subfolders (<class>/*.jpg, or train/<class>/*.jpg and "
            "test/<class>/*.jpg); point --data_dir at the folder holding them"
        )
    if not flat and not files["test"]:
        raise UserError(f"{where} has no test/<class>/ images; add a test split beside train/")
    if not flat:
        extra = sorted({cls for cls, _, _ in files["test"]} - set(classes))
        if extra:
            raise UserError(f"{where}: test/ has classes that train/ lacks ({', '.join(extra[:5])})")
    index = {c: i for i, c in enumerate(classes)}
    total, done = sum(len(files[split]) for split in splits), 0
    every = max(total // 100, 1)
    decoded, sizes = {}, {}
    for split in splits:
        images, labels = [], []
        for cls, name, raw in files[split]:
            if progress is not None and done % every == 0:
                progress(done, total)
            done += 1
            array = _decode(raw, name, where, image_size)
            sizes.setdefault(array.shape[:2], []).append(name)
            images.append(array)
            labels.append(index[cls])
        decoded[split] = (images, np.asarray(labels, np.int32))
    if progress is not None:
        progress(total, total)
    if len(sizes) > 1:
        found = ", ".join(
            f"{w}x{h} ({len(names):,}, e.g. {names[0]})"
            for (h, w), names in sorted(sizes.items(), key=lambda kv: -len(kv[1]))[:3]
        )
        raise UserError(
            f"{where} holds images of {len(sizes)} sizes: {found}; resize them on load with "
            "image_size=(H, W) (--image_size H,W)"
        )
    channels = max(a.shape[-1] for images, _ in decoded.values() for a in images)
    stack = lambda images: np.stack([np.repeat(a, channels // a.shape[-1], -1) for a in images])
    out = {"classes": np.asarray(classes)}
    for split, (images, labels) in decoded.items():
        out[f"{split}_images"], out[f"{split}_labels"] = stack(images), labels
    return out


def _source(path: str, image_size=None) -> dict:
    """What the decoded arrays come from: the folder's image files (names, sizes, times) or the
    archive's size and time, and the image size asked; the cache entry is named by it and
    records it."""
    if os.path.isdir(path):
        listing = _listing(path)
        files = {"count": len(listing), "listing": cache.key(repr(listing))}
    else:
        st = os.stat(path)
        files = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    size = {"image_size": list(image_size)} if image_size else {}
    return {"path": path, "format": CACHE_FORMAT, **files, **size}


def load(path: str, progress=None, *, test_split: float = 0.2, image_size=None):
    """The Dataset of an image folder or its archive (decoded once, then read from the cache);
    `progress(done, total)` follows a decoding: (0, None) before the files are read, then as
    `_arrays` decodes them. A folder without train/ and test/ gets `test_split` of its images
    held out as the test set (a fraction, or a count; seeded, stratified); `image_size` (H, W)
    resizes every image on load."""
    path = os.path.abspath(os.path.expanduser(path))
    image_size = tuple(int(d) for d in image_size) if image_size else None
    if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
        raise UserError(f"image_size takes a height and a width like 32,32, got {image_size}")
    source = _source(path, image_size)
    key = cache.key("image_folder", source)
    arrays = cache.load_arrays("images", key, source)
    if arrays is None:
        if progress is not None:
            progress(0, None)  # before the files are read: their count is not known yet
        files = _read_archive(path) if is_archive(path) else _read_folder(path)
        arrays = _arrays(files, path, progress, image_size)
        cache.save_arrays("images", key, arrays, source)
    classes = tuple(str(c) for c in arrays["classes"])
    split = None
    if "all_images" in arrays:
        images, labels = arrays["all_images"], arrays["all_labels"]
        held = holdout_indices(labels, test_split, TEST_SPLIT_SEED, what="test_split")
        keep = np.ones(len(labels), bool)
        keep[held] = False
        train, test = (images[keep], labels[keep]), (images[held], labels[held])
        split = {"test_split": test_split, "held_out": len(held), "of": len(labels), "seed": TEST_SPLIT_SEED}
    else:
        train = (arrays["train_images"], arrays["train_labels"])
        test = (arrays["test_images"], arrays["test_labels"])
    return Dataset(
        *train,
        *test,
        num_classes=len(classes),
        source=f"folder:{path}",
        name="folder",
        class_names=classes,
        test_split=split,
    )
