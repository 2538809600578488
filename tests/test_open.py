"""An open library: your own model, optimizer, augmentation, callbacks and datasets, each with the
seed recipe's guarantees (exact resume after SIGKILL, restore from the workdir, honest records,
one-line errors)."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import (
    ENV,
    ROOT,
    kill_after_first_epoch,
    metrics,
    random_dataset,
    run_json,
    stderr_lines,
    train,
    without_seconds,
)
from digits import digits_dataset
from image_files import write_folder
from own_parts import CNN, DropoutCNN, blank, identity, sgd_cosine

import resnet_jax as rj

HERE = os.path.dirname(os.path.abspath(__file__))
OWN_ENV = dict(ENV, PYTHONPATH=HERE + os.pathsep + ENV.get("PYTHONPATH", ""))


def own_run(workdir, epochs, background=False):
    cmd = [sys.executable, os.path.join(HERE, "own_run.py"), str(workdir), str(epochs)]
    if background:
        return subprocess.Popen(cmd, env=OWN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=OWN_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_own_model_and_optimizer_resume_bit_for_bit_and_restore_with_the_model(tmp_path):
    reference, workdir = tmp_path / "reference", tmp_path / "killed"
    out = own_run(reference, 3).stdout
    kill_after_first_epoch(own_run(workdir, 3, background=True), str(workdir))
    assert 1 <= len(metrics(workdir)) < 3, "the kill came too late to test anything"
    assert "Resuming" in own_run(workdir, 3).stdout
    assert without_seconds(metrics(workdir)) == without_seconds(metrics(reference))

    # The console, metrics.jsonl (and so TensorBoard and curves.png) show the optimizer's own rate:
    # the cosine's value at each epoch's first step, not the Config's 0.001.
    spe = 6  # 96 images, batch 16
    schedule = optax.cosine_decay_schedule(0.05, decay_steps=3 * spe)
    rates = [r["lr"] for r in metrics(reference)]
    np.testing.assert_allclose(rates, [float(schedule(e * spe)) for e in range(3)], rtol=1e-6)
    assert rates[0] == pytest.approx(0.05) and "Learning rate: 0.001" not in out
    assert f"Learning rate: {rates[1]:g}" in out

    # What ran is said and recorded: the model's class and size, the optimizer.
    assert "Model: CNN: 9,098 parameters, no batch norm" in out
    record = run_json(reference)["parts"]
    assert record["model"] == {
        "own": True,
        "class": "CNN",
        "name": "CNN",
        "parameters": 9098,
        "batch_stats": 0,
    }
    assert record["optimizer"]["own"] and "sgd_cosine" in record["optimizer"]["name"]
    assert record["augment"] == {"own": False, "name": "shift 0.1 + flip"}

    # Restored here, a process that trained neither: with the model (and the optimizer, to go on
    # training), bit for bit; without the model, one line saying to pass it.
    with pytest.raises(rj.UserError, match=r"your own model \(CNN\); pass it.*model=CNN"):
        rj.restore(str(workdir))
    a = rj.restore(str(workdir), "latest", model=CNN(), optimizer=sgd_cosine(spe, 3))
    b = rj.restore(str(reference), "latest", model=CNN(), optimizer=sgd_cosine(spe, 3))
    assert a.batch_stats == {} and int(a.step) == 3 * spe
    jax.tree.map(np.testing.assert_array_equal, (a.params, a.opt_state), (b.params, b.opt_state))
    c = rj.restore(str(workdir), "latest", model=CNN())  # the optimizer's state as saved, plain arrays
    jax.tree.map(np.testing.assert_array_equal, a.params, c.params)
    images = np.zeros((2, 28, 28, 1), np.uint8)
    np.testing.assert_array_equal(rj.predict(a, images), rj.predict(c, images))


@pytest.mark.slow
def test_a_resume_with_another_model_is_refused_naming_the_first_difference(tmp_path):
    ds = random_dataset(n_train=32, n_test=16, shape=(16, 16, 1))
    config = rj.presets.tiny(batch_size=8, epochs=1)
    workdir = str(tmp_path / "w")
    rj.train_and_evaluate(config, workdir, ds, model=CNN(), verbosity=0)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(rj.UserError) as e:
        rj.train_and_evaluate(
            config.__class__(**{**config.__dict__, "epochs": 2}),
            workdir,
            ds,
            model=CNN(features=(4, 16)),
            verbosity=0,
        )
    message = str(e.value)
    assert "another model" in message and "params['Conv_0']['bias']" in message and "(8,)" in message
    assert "\n" not in message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing set aside
    assert not os.path.exists(os.path.join(workdir, "checkpoints.damaged"))


@pytest.mark.slow
def test_an_augmentation_that_blanks_the_images_leaves_nothing_to_learn(tmp_path):
    ds = digits_dataset()
    config = rj.Config(epochs=3, batch_size=32, learning_rate=3e-3, lr_epochs=(), lr_factors=())
    accuracy = {}
    for fn in (identity, blank):
        _, history = rj.train_and_evaluate(
            config, str(tmp_path / fn.__name__), ds, model=CNN(), augment=fn, verbosity=0
        )
        accuracy[fn.__name__] = history[-1]["acc"]
        assert run_json(tmp_path / fn.__name__)["parts"]["augment"] == {
            "own": True,
            "name": f"own_parts.{fn.__name__}",
        }
    assert accuracy["blank"] < 0.2 and accuracy["identity"] > 0.9, accuracy


@pytest.mark.slow
def test_a_model_with_dropout_trains_with_a_key_per_step(tmp_path):
    ds = random_dataset(n_train=32, n_test=16, shape=(16, 16, 1))
    config = rj.presets.tiny(batch_size=8, epochs=1)
    state, history = rj.train_and_evaluate(config, str(tmp_path / "w"), ds, model=DropoutCNN(), verbosity=0)
    assert np.isfinite(history[-1]["loss"])
    x, y = jax.random.normal(jax.random.key(0), (8, 16, 16, 1)), np.arange(8) % 10
    step = jax.jit(rj.train_step)
    losses = [float(step(state, x, y, jax.random.key(k))[1]["loss"]) for k in (1, 1, 2)]
    assert losses[0] == losses[1] != losses[2]  # the key reaches the dropout: same key, same mask


@pytest.mark.slow
def test_a_callback_stops_the_run_and_the_same_call_trains_nothing(tmp_path, capsys):
    ds = random_dataset(n_train=32, n_test=16, shape=(16, 16, 1))
    config = rj.presets.tiny(batch_size=8, epochs=5)
    seen = []

    def early_stop(epoch, metrics, state):
        seen.append((epoch, sorted(metrics), int(state.step)))
        return epoch == 2

    workdir = str(tmp_path / "w")
    _, history = rj.train_and_evaluate(config, workdir, ds, callbacks=[early_stop], verbosity=1)
    assert [e for e, _, _ in seen] == [1, 2] and [s for _, _, s in seen] == [4, 8]
    assert "val_acc" in seen[0][1] and len(history) == 2
    assert "Stopped by a callback after epoch 2" in capsys.readouterr().out
    info = run_json(workdir)
    assert (
        info["finished"] and info["test"]["epoch"] == 2 and info["test"]["accuracy"] == history[-1]["val_acc"]
    )
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    _, again = rj.train_and_evaluate(config, workdir, ds, callbacks=[early_stop], verbosity=1)
    out = capsys.readouterr().out
    assert "is finished (stopped by a callback after epoch 2)" in out and "Epoch 3/5" not in out
    assert again == history and len(seen) == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == steps


def test_run_json_keeps_the_version_the_times_and_the_test_result(full_run):
    _, workdir = full_run
    info = run_json(workdir)
    assert info["version"] == rj.__version__ and info["started"] <= info["finished"]
    assert info["test"]["epoch"] == 3 and info["test"]["model"].startswith("final")
    assert info["test"]["accuracy"] == pytest.approx(metrics(workdir)[-1]["val_acc"])
    assert info["parts"]["model"] == {
        "own": False,
        "class": "ResNet",
        "name": "ResNet v1, 4 filters, blocks 1,1,1",
        "parameters": 5250,
        "batch_stats": 120,
    }


# Bad input of each new kind: one UserError line, nothing lost ----------------------------------


def test_parts_that_do_not_fit_are_one_line_each(tmp_path):
    ds = random_dataset(n_train=16, n_test=8, shape=(16, 16, 1))
    config = rj.presets.tiny(batch_size=8, epochs=1)
    cases = [
        (dict(model=CNN(num_classes=5)), r"shape \(2, 5\).*must return float logits of shape \(2, 10\)"),
        (dict(model="resnet"), "must be a flax.linen.Module"),
        (dict(model=CNN(features=[8, 16])), "unhashable attributes"),
        (dict(optimizer="adam"), "optimizer must be an optax.GradientTransformation"),
        (dict(optimizer=optax.adam), r"an optax constructor; call it"),
        (dict(optimizer=lambda spe: "sgd"), "must return an optax.GradientTransformation"),
        (dict(augment=lambda key, x: x[:, :8]), r"into float32 of shape \(8, 8, 16, 1\); it must return"),
        (dict(augment=lambda key, x: x.astype(np.float16)), "into float16 of shape"),
        (dict(augment=lambda x: x), r"must be called as augment\(key, images\)"),
        (dict(augment=lambda key, x: x * float(x.sum())), "is not jit-able"),
    ]
    for i, (kw, message) in enumerate(cases):
        with pytest.raises(rj.UserError, match=message) as e:
            rj.train_and_evaluate(config, str(tmp_path / f"w{i}"), ds, verbosity=0, **kw)
        assert "\n" not in str(e.value)
        assert not os.path.exists(tmp_path / f"w{i}" / "checkpoints")


def test_a_model_without_a_train_argument_is_named():
    import flax.linen as nn

    class NoTrain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(x.mean((1, 2)))

    with pytest.raises(rj.UserError, match="must take a `train` argument"):
        rj.create_train_state(rj.presets.tiny(), jax.random.key(0), (8, 8, 1), 1, model=NoTrain())


# Datasets: any tfds image-classification dataset, folders of images -------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize(
    "name, shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("svhn_cropped", (32, 32, 3))]
)
@pytest.mark.slow
def test_tfds_image_datasets_load_and_train(name, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        ds = rj.load_dataset(name)
    assert ds.train_images.shape == (24, *shape) and ds.test_images.shape == (24, *shape)
    assert ds.train_images.dtype == np.uint8 and ds.num_classes == 10 and ds.name == name
    _, history = rj.train_and_evaluate(
        rj.presets.tiny(batch_size=8, epochs=1), str(tmp_path / "w"), ds, verbosity=0
    )
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    info = run_json(tmp_path / "w")
    assert info["config"]["dataset"] == name and info["data"]["source"] == f"tfds:{name}"


def test_datasets_that_are_not_image_classification_are_refused():
    with pytest.raises(rj.UserError, match="imdb_reviews is not an image-classification dataset"):
        rj.load_dataset("imdb_reviews")
    with pytest.raises(rj.UserError, match="images of varying size"):
        rj.load_dataset("oxford_flowers102")
    with pytest.raises(rj.UserError, match="unknown dataset 'cifar11': not a tensorflow-datasets name"):
        rj.load_dataset("cifar11")


@pytest.mark.slow
def test_in_memory_arrays_are_recorded_as_arrays_not_a_dataset_name(tmp_path):
    ds = random_dataset(n_train=16, n_test=8, shape=(8, 8, 3))
    rj.train_and_evaluate(rj.presets.tiny(batch_size=8, epochs=1), str(tmp_path / "w"), ds, verbosity=0)
    info = run_json(tmp_path / "w")
    assert info["config"]["dataset"] == "arrays" and info["data"]["source"] == "arrays"
    assert info["data"]["fingerprint"] == ds.fingerprint()


@pytest.mark.parametrize("gray", [False, True])
def test_an_image_folder_and_its_archive_load_as_the_arrays_they_hold(tmp_path, gray):
    import tarfile

    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    arrays = write_folder(root, rng, gray=gray)
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="pets")
    folder = os.path.join(rj.process.cache_home(), "images")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    for path in (root, archive, archive):  # the third read comes from the cache
        ds = rj.load_dataset(data_dir=str(path))
        np.testing.assert_array_equal(ds.train_images, arrays["train"][0])
        np.testing.assert_array_equal(ds.train_labels, arrays["train"][1])
        np.testing.assert_array_equal(ds.test_images, arrays["test"][0])
        np.testing.assert_array_equal(ds.test_labels, arrays["test"][1])
        assert ds.class_names == ("cat", "dog", "emu") and ds.num_classes == 3 and ds.name == "folder"
        assert ds.image_shape == (10, 12, 1 if gray else 3)
    assert len(set(os.listdir(folder)) - before) == 2  # one decoded copy per source


def test_bad_image_folders_and_archives_are_one_line(tmp_path):
    import io
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "mixed"
    write_folder(root, rng)
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(root / "test" / "dog" / "odd.png")
    with pytest.raises(
        rj.UserError,
        match=re.escape(
            "holds images of 2 sizes: 12x10 (19, e.g. train/cat/000.png), 9x7 (1, e.g. test/dog/odd.png)"
        ),
    ):
        rj.load_dataset(data_dir=str(root))
    (root / "test" / "dog" / "odd.png").unlink()
    (root / "test" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(rj.UserError, match=r"test/dog/broken.jpg is not a readable image"):
        rj.load_dataset(data_dir=str(root))
    (root / "test" / "dog" / "broken.jpg").unlink()
    os.makedirs(root / "test" / "yak")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "test" / "yak" / "0.png")
    with pytest.raises(rj.UserError, match=r"test/ has classes that train/ lacks \(yak\)"):
        rj.load_dataset(data_dir=str(root))

    evil = tmp_path / "evil.tar.gz"
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    with tarfile.open(evil, "w:gz") as tar:
        for name in ("train/cat/0.png", "test/cat/0.png", "../outside/train/cat/1.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    with pytest.raises(rj.UserError, match=r"leaves its folder \(../outside/train/cat/1.png\)"):
        rj.load_dataset(data_dir=str(evil))
    assert not (tmp_path / "outside").exists()


@pytest.mark.slow
def test_the_command_line_trains_on_an_image_archive_and_refuses_other_data(tmp_path):
    import tarfile

    from conftest import train

    root = tmp_path / "pets"
    write_folder(root, np.random.default_rng(2))
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="pets")
    workdir = str(tmp_path / "w")
    tiny = ["--num_filters", "4", "--stage_sizes", "1,1,1", "--batch_size", "5", "--epochs", "1"]
    out = train("--workdir", workdir, "--data_dir", str(archive), *tiny).stdout
    assert "Data: folder (folder:" in out and "15 train / 4 test images of 10x12x3, 3 classes" in out
    assert "Test accuracy" in out
    assert run_json(workdir)["config"]["dataset"] == "folder"
    # --eval_only finds the folder from the run's record
    assert "Test accuracy" in train("--workdir", workdir, "--eval_only").stdout
    proc = train("--workdir", str(tmp_path / "x"), "--dataset", "imdb_reviews", check=False)
    assert proc.returncode == 2 and "not an image-classification dataset" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.slow
def test_readme_snippets_for_your_own_parts_run(tmp_path):
    """The README's "Your own model, optimizer, augmentation and data" snippets, in order, with
    their data and workdirs pointed at small local files."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"<!-- own -->\s*```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 4
    root = tmp_path / "images"
    write_folder(root, np.random.default_rng(3))
    archive = '"../shared/data/cifar10-jpeg75.tar.gz"'
    sample = ".subset(train=5000, test=1000)"
    assert archive in blocks[0] and sample in blocks[0] and "epochs=5, batch_size=50" in blocks[0]
    scope = {"__name__": "readme"}
    with tfds.testing.mock_data(num_examples=64):  # fashion_mnist without a download
        for code in blocks:
            code = code.replace(archive, f'"{root}"').replace(sample, "").replace('"runs/', f'"{tmp_path}/')
            code = code.replace("epochs=5, batch_size=50", "epochs=2, batch_size=5")
            exec(compile(code, "README.md", "exec"), scope)
    for run in ("cnn", "sgd", "aug", "fashion"):
        assert run_json(tmp_path / run)["test"] is not None, run  # each ran to its test result
    assert run_json(tmp_path / "sgd")["parts"]["optimizer"]["learning_rate"] == "inject_hyperparams"
    assert scope["state"].model.__class__.__name__ == "ResNet"  # the fashion run's (the default model)


@pytest.mark.slow
def test_evaluation_refuses_data_of_other_classes_or_shapes_in_one_line(tmp_path):
    """A 3-class model evaluated on a 2-class folder returned an accuracy without a word: now
    evaluate, evaluate_checkpoint and --eval_only refuse other classes, other class names and
    other image shapes in one line; a restored run knows its class names."""
    rng = np.random.default_rng(0)
    write_folder(tmp_path / "pets", rng)
    pets = rj.load_dataset(data_dir=str(tmp_path / "pets"), verbose=False)
    workdir = str(tmp_path / "w")
    rj.train_and_evaluate(rj.preset("tiny", batch_size=5, epochs=1), workdir, pets, verbosity=0)
    state = rj.restore(workdir)
    assert state.config.class_names == ("cat", "dog", "emu")  # kept with the run
    arrays = (pets.train_images, pets.train_labels, pets.test_images, pets.test_labels)
    two = rj.Dataset(arrays[0], arrays[1] % 2, arrays[2], arrays[3] % 2)  # 2 classes
    renamed = rj.Dataset(*arrays, num_classes=3, class_names=("ant", "bee", "cow"))
    small = rj.Dataset(arrays[0][:, :8], arrays[1], arrays[2][:, :8], arrays[3], 3)
    cases = (
        (two, "has 3 classes, the data 2"),
        (renamed, "class 0 is 'cat', the data's is 'ant'"),
        (small, "images of shape"),
    )
    for data, words in cases:
        for call in (rj.evaluate, rj.evaluate_checkpoint):
            with pytest.raises(rj.UserError, match=re.escape(words)) as e:
                call(state, data) if call is rj.evaluate else call(workdir, dataset=data)
            assert "\n" not in str(e.value)
    assert rj.evaluate(state, pets)[1] >= 0  # its own data still evaluates
    write_folder(tmp_path / "other", rng)
    os.rename(tmp_path / "other" / "train" / "emu", tmp_path / "other" / "train" / "yak")
    proc = train("--workdir", workdir, "--eval_only", "--data_dir", str(tmp_path / "other"), check=False)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1 and "class 2 is 'emu'" in proc.stderr, (
        proc.stderr
    )


@pytest.mark.slow
def test_the_command_line_trains_on_class_folders_alone_and_resizes_mixed_sizes(tmp_path):
    from test_data import write_flat

    mixed = write_flat(str(tmp_path / "mixed"), sizes={("bee", 3): (12, 6)})
    workdir = str(tmp_path / "w")
    flags = ["--preset", "tiny", "--batch_size", "8", "--epochs", "1"]
    refused = train("--workdir", workdir, "--data_dir", mixed, *flags, check=False)
    assert refused.returncode == 2 and "--image_size H,W" in refused.stderr and not os.path.exists(workdir)
    out = train("--workdir", workdir, "--data_dir", mixed, *flags, "--image_size", "8,8").stdout
    assert "24 train / 6 test images of 8x8x3, 3 classes; the test set held out of the folder's 30" in out
    info = json.load(open(os.path.join(workdir, "run.json")))
    assert info["data"]["test_split"] == {"test_split": 0.2, "held_out": 6, "of": 30, "seed": 0}
    assert info["config"]["image_size"] == [8, 8] and info["config"]["class_names"] == ["ant", "bee", "cow"]
    assert "Test accuracy" in train("--workdir", workdir, "--eval_only").stdout  # its own data again
