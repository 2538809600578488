"""Loading: tfds (mocked), the official archives (written here), the user's arrays; bad input."""

import os
import pickle
import socket
import tarfile
import time

import numpy as np
import pytest
from cifar_files import write_cifar

import resnet_jax as rj
from resnet_jax.data import tfds_data

tfds = pytest.importorskip("tensorflow_datasets")


def check_same(ds, arrays):
    xtr, ytr, xte, yte = arrays
    np.testing.assert_array_equal(ds.train_images, xtr)
    np.testing.assert_array_equal(ds.train_labels, ytr)
    np.testing.assert_array_equal(ds.test_images, xte)
    np.testing.assert_array_equal(ds.test_labels, yte)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape[1:] == (32, 32, 3)
    assert tuple(ds.train_images[0, 0, 0]) == (1, 2, 3)  # channel-major rows decoded as RGB


@pytest.mark.parametrize("tar", [True, False])
def test_cifar10_archive_and_folder(tmp_path, tar):
    path, arrays = write_cifar(tmp_path, rows=(7, 5, 9, 3, 6), test_rows=11, tar=tar)
    for where in (path, tmp_path):  # the archive/folder itself, or a directory holding it
        ds = rj.load_dataset("cifar10", data_dir=str(where))
        check_same(ds, arrays)
        assert ds.num_classes == 10 and len(ds.train_images) == 30


@pytest.mark.parametrize("tar", [True, False])
def test_cifar100_archive_and_folder(tmp_path, tar):
    path, arrays = write_cifar(
        tmp_path, name="cifar100", rows=(40,), test_rows=12, tar=tar, bytes_keys=not tar
    )
    ds = rj.load_dataset("cifar100", data_dir=str(tmp_path))
    check_same(ds, arrays)
    assert ds.num_classes == 100


@pytest.mark.slow
def test_tfds_path_under_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        ds = rj.load_dataset("cifar10")
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.test_images.shape == (12, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.num_classes == 10
    assert ds.train_labels.max() < 10


def test_offline_without_data_fails_fast_naming_both_options(tmp_path, monkeypatch):
    """Fast: each download host tried once (one that does not refuse at once costs its 5 s
    timeout), no retries, nothing slept. Counted, not timed."""
    tried, slept = [], []

    def no_network(address, *args, **kwargs):
        tried.append(address)
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(time, "sleep", slept.append)
    with pytest.raises(rj.UserError) as e:
        rj.load_dataset("cifar10", data_dir=str(tmp_path))
    assert tried and all(tried.count(host) == 1 for host in tried) and not slept, (tried, slept)
    assert set(tried) <= set(tfds_data.DOWNLOAD_HOSTS)
    assert "cifar-10-python.tar.gz" in str(e.value) and "tfds data_dir" in str(e.value)


def test_own_arrays_any_shape_and_classes():
    rng = np.random.default_rng(0)
    ds = rj.Dataset(
        rng.integers(0, 256, (10, 12, 20, 1), dtype=np.uint8),
        np.arange(10) % 4,
        rng.integers(0, 256, (3, 12, 20, 1), dtype=np.uint8),
        np.array([0, 1, 3]),
    )
    assert ds.num_classes == 4 and ds.image_shape == (12, 20, 1)


def test_pixel_mean():
    images = np.stack([np.full((2, 2, 3), 0, np.uint8), np.full((2, 2, 3), 255, np.uint8)])
    images[1, 0, 0, 0] = 51
    mean = rj.data.dataset.pixel_mean(images)
    assert mean.dtype == np.float32 and mean.shape == (2, 2, 3)
    assert mean[0, 0, 0] == pytest.approx(0.1) and mean[1, 1, 2] == pytest.approx(0.5)


def test_bad_inputs(tmp_path):
    with pytest.raises(rj.UserError, match="unknown dataset 'no_such_dataset'"):
        rj.load_dataset("no_such_dataset")
    with pytest.raises(rj.UserError, match="does not exist"):
        rj.load_dataset("cifar10", data_dir=str(tmp_path / "nope"))
    # truncated archive
    path, _ = write_cifar(tmp_path / "t")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(rj.UserError, match="truncated or not a CIFAR tar.gz"):
        rj.load_dataset("cifar10", data_dir=path)
    # a foreign archive (tar.gz of something else)
    foreign = tmp_path / "f" / "cifar-10-python.tar.gz"
    foreign.parent.mkdir()
    with tarfile.open(foreign, "w:gz") as t:
        t.add(__file__, arcname="notes.py")
    with pytest.raises(rj.UserError, match="not a complete cifar10 archive"):
        rj.load_dataset("cifar10", data_dir=str(foreign))
    # wrong pickle contents
    folder = tmp_path / "p" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": [1, 2, 3]}))
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(rj.UserError, match="lacks the 'data' and 'labels'"):
        rj.load_dataset("cifar10", data_dir=str(folder))
    # a pickle that would run code is refused, not executed
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_1").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(rj.UserError, match="not a CIFAR batch file"):
        rj.load_dataset("cifar10", data_dir=str(folder))
    assert not marker.exists()
    # the other dataset's archive
    write_cifar(tmp_path / "c100", name="cifar100", rows=(5,), test_rows=5)
    with pytest.raises(rj.UserError, match="pass the matching --dataset"):
        rj.load_dataset("cifar10", data_dir=str(tmp_path / "c100"))


def test_bad_arrays():
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.zeros(4, int)
    with pytest.raises(rj.UserError, match="must be uint8"):
        rj.Dataset(x.astype(np.float32), y, x, y)
    with pytest.raises(rj.UserError, match=r"must be \(N, H, W, C\)"):
        rj.Dataset(x[..., 0], y, x, y)
    with pytest.raises(rj.UserError, match="test_labels must be"):
        rj.Dataset(x, y, x, y[:3])
    with pytest.raises(rj.UserError, match=r"labels must be in \[0, 3\)"):
        rj.Dataset(x, y + 3, x, y, num_classes=3)


def write_flat(root, sizes=None, per_class=10, classes=("ant", "bee", "cow")):
    """<class>/*.png with no train/ or test/ (Keras's image_dataset_from_directory layout);
    `sizes` {(class, index): (width, height)} for images of another size (8x8 otherwise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in classes:
        os.makedirs(os.path.join(root, cls))
        for i in range(per_class):
            w, h = (sizes or {}).get((cls, i), (8, 8))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(root, cls, f"{i}.png")
            )
    return root


def test_a_folder_of_class_subfolders_alone_gets_a_seeded_stratified_test_split(tmp_path):
    flat = write_flat(str(tmp_path / "flat"))
    ds = rj.load_dataset(data_dir=flat, verbose=False)
    assert (len(ds.train_images), len(ds.test_images)) == (24, 6) and ds.class_names == ("ant", "bee", "cow")
    assert np.bincount(ds.test_labels).tolist() == [2, 2, 2]  # stratified: each class its share
    again = rj.load_dataset(data_dir=flat, verbose=False)
    np.testing.assert_array_equal(again.test_images, ds.test_images)  # seeded: the same test set
    assert ds.describe()["test_split"] == {"test_split": 0.2, "held_out": 6, "of": 30, "seed": 0}
    count = rj.load_dataset(data_dir=flat, verbose=False, test_split=9)
    assert len(count.test_images) == 9 and len(count.train_images) == 21
    with tarfile.open(tmp_path / "flat.tar.gz", "w:gz") as tar:  # its archive too
        tar.add(flat, arcname="flat")
    packed = rj.load_dataset(data_dir=str(tmp_path / "flat.tar.gz"), verbose=False)
    np.testing.assert_array_equal(packed.test_images, ds.test_images)
    with pytest.raises(rj.UserError, match="test_split 40 asks for 40 of the 30 images"):
        rj.load_dataset(data_dir=flat, verbose=False, test_split=40)


def test_images_of_other_sizes_are_refused_naming_them_or_resized_when_asked(tmp_path):
    mixed = write_flat(
        str(tmp_path / "mixed"), sizes={("bee", 3): (12, 6), ("cow", 1): (12, 6), ("ant", 0): (5, 5)}
    )
    with pytest.raises(rj.UserError) as e:
        rj.load_dataset(data_dir=mixed, verbose=False)
    message = str(e.value)
    assert "3 sizes: 8x8 (27" in message and "12x6 (2" in message and "5x5 (1" in message
    assert "image_size=(H, W) (--image_size H,W)" in message and "\n" not in message
    ds = rj.load_dataset(data_dir=mixed, verbose=False, image_size=(8, 8))
    assert ds.image_shape == (8, 8, 3) and len(ds.train_images) + len(ds.test_images) == 30
    small = rj.load_dataset(data_dir=mixed, verbose=False, image_size=(4, 6))
    assert small.image_shape == (4, 6, 3)
    assert rj.Config(image_size="4,6").image_size == (4, 6)
    with pytest.raises(rj.UserError, match="image_size takes a height and a width"):
        rj.Config(image_size=(4, 6, 3))
