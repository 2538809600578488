"""What a new user hits following the README: dataset names, offline advice, the
README's commands, a mixed sample, the CPU split, --help defaults, and the small wording."""

import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import ENV, ROOT, TINY, StopSoon, random_dataset, train

import resnet_jax as rj
from resnet_jax import flags, tuning
from resnet_jax.data import image_folder


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar-10", "CIFAR10", "cifar_10"])
def test_a_dataset_name_tfds_cannot_parse_is_one_line_with_the_closest_name(name, tmp_path):
    workdir = tmp_path / "w"
    # the first through the real command line: a process of its own, as the user ran it (in a
    # shell that does not quiet TensorFlow: no TF_CPP_MIN_LOG_LEVEL); the others in this process
    env = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"} if name == "cifar-10" else None
    proc = train("--workdir", str(workdir), "--dataset", name, *TINY, check=False, env=env)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1, proc.stderr
    assert f"unknown dataset {name!r}" in proc.stderr and "did you mean cifar10?" in proc.stderr
    assert not workdir.exists()  # a failed start leaves no workdir holding only .lock
    with pytest.raises(rj.UserError, match="did you mean cifar10"):
        rj.load_dataset(name)


def cpu_flags() -> str:
    """The CPU's model and AVX-512 flags (TensorFlow's oneDNN notice is on where they are)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    avx512 = sorted({f for f in (flags[1].split() if flags else []) if f.startswith("avx512")})
    return f"{model[1] if model else 'CPU'}; AVX-512 flags: {' '.join(avx512) or 'none'}"


@pytest.mark.slow
@pytest.mark.parametrize("onednn", [None, "1"])
def test_the_tfds_path_prints_nothing_and_leaves_the_environment_as_it_was(onednn):
    """TensorFlow's start-up notices stay quiet in Python too, and TF_CPP_MIN_LOG_LEVEL (JAX's 1
    after its import) is what it was again afterwards (TensorFlow's own variables aside). With
    TF_ENABLE_ONEDNN_OPTS=1 TensorFlow logs its oneDNN notice on any CPU, as it does by itself on
    an AVX-512 Xeon: the test fails there and here alike without the quieting."""
    env = {k: v for k, v in ENV.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    code = (
        "import os, resnet_jax as rj\n"
        "before = os.environ.get('TF_CPP_MIN_LOG_LEVEL')\n"
        "try:\n    rj.load_dataset('cifar_10')\nexcept rj.UserError:\n    pass\n"
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL') == before)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    where = f"on {cpu_flags()}, TF_ENABLE_ONEDNN_OPTS={onednn}"
    assert proc.returncode == 0 and proc.stdout == "True\n" and not proc.stderr.strip(), (where, proc.stderr)


def test_what_is_written_while_tensorflow_loads_is_kept_but_its_notices(capfd):
    from resnet_jax.data import tfds_data

    with tfds_data._start_up_quiet():
        os.write(
            2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        )
        os.write(2, b"I0000 00:00:1796615793.518753   12640 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"E0000 00:00:1796615793.518753   12640 cuda.cc:1] a real error\n")
        os.write(2, b"To enable the following instructions: AVX2 FMA, in other operations, rebuild ...\n")
        os.write(2, b"something else\n")
    err = capfd.readouterr().err
    assert err == "E0000 00:00:1796615793.518753   12640 cuda.cc:1] a real error\nsomething else\n", err


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
        args = flags.parse(flags.build_parser(), argv)  # a bad flag would exit with a usage error
        data = args.data_dir
        # a path of the repository exists; the workplace's copy of CIFAR-10 (not on every machine)
        # is named as its README names it, and where it is there, it is an image-folder archive
        workplace = "../shared/data/cifar10-jpeg75.tar.gz"
        assert data is None or data == workplace or os.path.exists(os.path.join(ROOT, data)), command
        if data == workplace and os.path.exists(os.path.join(ROOT, data)):
            assert image_folder.looks_like(os.path.join(ROOT, data)), command


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


@pytest.mark.slow
def test_resume_and_finish_lines_say_where_the_run_stands(full_run, archive, tmp_path, capsys):
    _, workdir = full_run
    out = train("--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY).stdout
    assert "is finished" in out and "Resuming" not in out  # a finished run does not resume
    config = rj.presets.tiny(batch_size=8, epochs=2, device_loop="scan", steps_per_call=2)
    ds = random_dataset(n_train=56)

    with pytest.raises(rj.errors.Interrupted):
        rj.train_and_evaluate(config, str(tmp_path / "w"), ds, verbosity=0, stop=StopSoon())
    rj.train_and_evaluate(config, str(tmp_path / "w"), ds, verbosity=1)
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Resuming")]
    assert len(resumed) == 1 and "at epoch 1, step" in resumed[0]
    assert "no epoch finished yet" in resumed[0] and "-inf" not in resumed[0]


@pytest.mark.slow
def test_recovery_messages_name_the_fix(archive, tmp_path, monkeypatch):
    # a misspelt flag
    proc = train("--workdir", str(tmp_path / "a"), "--epcohs", "1", check=False)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1
    assert "unrecognized arguments: --epcohs 1; did you mean --epochs?" in proc.stderr
    # a run made with --preset tiny, resumed without it
    workdir = str(tmp_path / "tiny")
    train(
        "--workdir", workdir, "--data_dir", archive, "--preset", "tiny", "--epochs", "1", "--batch_size", "16"
    )
    proc = train(
        "--workdir", workdir, "--data_dir", archive, "--epochs", "2", "--batch_size", "16", check=False
    )
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1
    assert "num_filters 4 (now 32)" in proc.stderr and "rerun with --preset tiny" in proc.stderr
    # --eval_only (the best checkpoint) before an epoch has finished: the mid-epoch one is named
    ds = random_dataset(n_train=56)

    config = rj.presets.tiny(batch_size=8, epochs=2, device_loop="scan", steps_per_call=2)
    with pytest.raises(rj.Interrupted):
        rj.train_and_evaluate(config, str(tmp_path / "mid"), ds, verbosity=0, stop=StopSoon())
    with pytest.raises(
        rj.UserError, match=r"no best checkpoint yet .* pass which='latest' \(--which latest\)"
    ):
        rj.evaluate_checkpoint(str(tmp_path / "mid"), dataset=ds)
    loss, accuracy = rj.evaluate_checkpoint(str(tmp_path / "mid"), "latest", dataset=ds)
    assert 0 <= accuracy <= 1
    # an empty data folder, offline (tfds would download into it)
    (tmp_path / "empty").mkdir()
    with monkeypatch.context() as m:
        m.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
        with pytest.raises(
            rj.UserError, match=r"data_dir \S+ is empty and cifar10 cannot be downloaded offline"
        ) as e:
            rj.load_dataset("cifar10", data_dir=str(tmp_path / "empty"))
        assert len(str(e.value)) - len(str(tmp_path / "empty")) < 160  # under 200 with a short path (330)


def test_decoding_into_the_cache_says_so_once(tmp_path, capsys):
    from image_files import write_folder

    write_folder(tmp_path / "pets", np.random.default_rng(3))
    rj.load_dataset(data_dir=str(tmp_path / "pets"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Decoding the images of {tmp_path / 'pets'} into the cache, once..."
    assert re.fullmatch(r"Decoded 19 images in \d+\.\d s; later runs read them from the cache", out[1])
    assert len(out) == 2
    rj.load_dataset(data_dir=str(tmp_path / "pets"))  # from the cache: nothing to say
    write_folder(tmp_path / "quiet", np.random.default_rng(4))
    rj.load_dataset(data_dir=str(tmp_path / "quiet"), verbose=False)
    assert capsys.readouterr().out == ""


def test_an_offline_tfds_attempt_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "tmpminetfds").mkdir()  # someone else's, made before: left alone
    with pytest.raises(rj.UserError, match="cannot download fashion_mnist"):
        rj.load_dataset("fashion_mnist")
    assert sorted(os.listdir(tmp_path)) == ["tmpminetfds"]
