"""What a new user hits following the README (issue 33): dataset names, offline advice, the
README's commands, a mixed sample, the CPU split, --help defaults, and the small wording."""

import os
import re
import shlex
import socket
import tarfile

import numpy as np
import pytest
from conftest import ENV, ROOT, TINY, random_dataset, train

import resnet_jax as rj
from resnet_jax import cli, tuning


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["cifar-10", "CIFAR10", "cifar_10"])
def test_a_dataset_name_tfds_cannot_parse_is_one_line_with_the_closest_name(name, tmp_path):
    workdir = tmp_path / "w"
    # through the real command line: a process of its own, as the user ran it
    proc = train("--workdir", str(workdir), "--dataset", name, *TINY, check=False, env=ENV)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1, proc.stderr
    assert f"unknown dataset {name!r}" in proc.stderr and "did you mean cifar10?" in proc.stderr
    assert not workdir.exists()  # a failed start leaves no workdir holding only .lock
    with pytest.raises(rj.UserError, match="did you mean cifar10"):
        rj.load_dataset(name)


def test_a_folder_holding_an_image_archive_says_to_pass_the_archive(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "pets"
    for split in ("train", "test"):
        os.makedirs(root / split / "cat")
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / split / "cat" / "0.png")
    folder = tmp_path / "downloads"
    folder.mkdir()
    with tarfile.open(folder / "pets.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="pets")

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(rj.UserError) as e:
        rj.load_dataset("cifar10", data_dir=str(folder))
    message = str(e.value)
    assert str(folder / "pets.tar.gz") in message and "pass the archive itself" in message
    assert "\n" not in message
    with pytest.raises(rj.UserError, match=r"data_dir \(--data_dir\)"):  # a Python caller is told data_dir=
        rj.load_dataset("cifar10", data_dir=str(tmp_path / "missing"))


def test_every_train_py_command_in_the_readme_parses_and_its_paths_exist():
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"^\s*(?:\$ )?(python train\.py .*)$", readme, re.M)
    assert commands, "the README shows train.py commands"
    for command in commands:
        argv = shlex.split(command)[2:]
        args = cli.parse(cli.build_parser(), argv)  # a bad flag would exit with a usage error
        data = args.data_dir
        if data is not None and data.startswith("../shared") and not os.path.exists(os.path.join(ROOT, data)):
            continue  # the workplace's copy of CIFAR-10: not on every machine
        assert data is None or os.path.exists(os.path.join(ROOT, data)), command


def test_a_subset_is_a_seeded_random_sample_with_the_classes_mixed():
    labels = np.repeat(np.arange(4), 10)  # sorted by class, as an image folder lists them
    images = np.zeros((40, 4, 4, 1), np.uint8)
    ds = rj.Dataset(images, labels, images, labels)
    a, b = ds.subset(train=20, test=8), ds.subset(train=20, test=8)
    assert len(a.train_images) == 20 and len(a.test_images) == 8 and a.num_classes == 4
    np.testing.assert_array_equal(a.test_labels, b.test_labels)  # seeded
    assert len(set(a.test_labels[:8].tolist())) > 1  # not the first class only
    with pytest.raises(rj.UserError, match="between 1 and 40"):
        ds.subset(train=41)


def test_start_up_explains_why_a_small_model_gets_one_cpu_device(full_run):
    out = full_run[0].stdout
    if tuning.cores() > 1:
        assert f"1 of {tuning.cores()} cores as devices (the model is small" in out
    assert "one device for small models" in " ".join(train("--help").stdout.split())


def test_help_shows_every_default():
    out = re.sub(r"\s+", " ", train("--help").stdout)
    assert "init and data keys derive from it (default: 0)" in out
    assert "(Flax's is 1e-5) (default: 0.001)" in out
    assert "the CPU's python loop paces its calls to about 0.5 s" in out


def test_resume_and_finish_lines_say_where_the_run_stands(full_run, archive, tmp_path, capsys):
    _, workdir = full_run
    out = train("--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY).stdout
    assert "is finished" in out and "Resuming" not in out  # a finished run does not resume
    config = rj.tiny(batch_size=8, epochs=2, device_loop="scan", steps_per_call=2)
    ds = random_dataset(n_train=56)

    class StopSoon:  # a stop request at the loop's second look: mid-epoch 1
        asked = 0

        def is_set(self):
            self.asked += 1
            return self.asked >= 2

    with pytest.raises(rj.errors.Interrupted):
        rj.train_and_evaluate(config, str(tmp_path / "w"), ds, verbosity=0, stop=StopSoon())
    rj.train_and_evaluate(config, str(tmp_path / "w"), ds, verbosity=1)
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Resuming")]
    assert len(resumed) == 1 and "at epoch 1, step" in resumed[0]
    assert "no epoch finished yet" in resumed[0] and "-inf" not in resumed[0]
