"""Small folders of images in class subfolders, written by the tests."""

import os

import numpy as np


def write_folder(root, rng, size=(12, 10), gray=False):
    """train/ and test/ class folders of PNG images (lossless); returns the arrays they hold."""
    from PIL import Image

    arrays = {}
    for split, n in (("train", 5), ("test", 2)):
        images, labels = [], []
        for label, cls in enumerate(("cat", "dog", "emu")):  # sorted: labels 0, 1, 2
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n if cls != "emu" or split == "train" else 0):  # no emu in test/
                shape = size[::-1] + (() if gray else (3,))
                array = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(array).save(os.path.join(root, split, cls, f"{i:03d}.png"))
                images.append(array if not gray else array[..., None])
                labels.append(label)
        arrays[split] = (np.stack(images), np.asarray(labels))
    with open(os.path.join(root, "train", "notes.txt"), "w") as f:
        f.write("not an image, not a class folder")
    return arrays
