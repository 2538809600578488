"""Compile once: train.py keeps its compiled programs in the user's cache directory, a second run of
the same shapes (another workdir, another process) compiles none of them and computes the same
numbers; JAX_COMPILATION_CACHE_DIR wins; --no-compilation_cache keeps nothing."""

import os

import pytest
from conftest import ENV, TINY, metrics, stderr_lines, train, without_seconds

from resnet_jax import process

pytestmark = pytest.mark.slow  # end-to-end: the whole file


def entries(folder, programs=("jit__train_chunk", "jit__evaluate", "jit_init")):
    """The cached programs that cost a run its compile time: the train calls, the evaluation, the
    initialisation (small helpers vary with how many steps a call ran, which follows the load)."""
    return {n for n in os.listdir(folder) if n.startswith(programs)} if os.path.isdir(folder) else set()


def test_a_second_run_of_the_same_shapes_compiles_nothing(archive, tmp_path):
    env = dict(ENV, XDG_CACHE_HOME=str(tmp_path / "home-cache"))
    folder = tmp_path / "home-cache" / "resnet_jax" / "xla"
    train("--workdir", str(tmp_path / "a"), "--data_dir", archive, "--epochs", "2", *TINY, env=env)
    first = entries(folder)
    assert any(n.startswith("jit__train_chunk") for n in first) and any(
        n.startswith("jit__evaluate") for n in first
    )
    train("--workdir", str(tmp_path / "b"), "--data_dir", archive, "--epochs", "2", *TINY, env=env)
    assert entries(folder) == first  # every program the run needed came from the cache
    assert without_seconds(metrics(tmp_path / "a")) == without_seconds(metrics(tmp_path / "b"))

    # Where a process's programs go, seen on a cheaper process: run a's evaluation (--eval_only
    # compiles the same evaluation program, found in `folder` unless the setting is obeyed).
    own = tmp_path / "jax-cache"
    env_jax = dict(env, JAX_COMPILATION_CACHE_DIR=str(own))
    evaluated = train("--workdir", str(tmp_path / "a"), "--eval_only", env=env_jax).stdout
    assert entries(own) and entries(folder) == first  # JAX's own setting wins

    # Damaged entries (bytes flipped in half of them, the others truncated): one warning line,
    # the programs compiled again, the same result as that evaluation's (the evaluation program
    # in `folder` is the training run's: `first` holds it).
    for i, name in enumerate(sorted(os.listdir(folder))):
        path = folder / name
        data = bytearray(path.read_bytes())
        if i % 2:
            path.write_bytes(data[: len(data) // 3])
        else:
            for k in range(len(data) // 2, len(data) // 2 + 16):
                data[k] ^= 0xFF
            path.write_bytes(bytes(data))
    proc = train("--workdir", str(tmp_path / "a"), "--eval_only", env=env)
    assert len(stderr_lines(proc)) == 1 and "could not be used" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-2:] == evaluated.splitlines()[-2:]  # Test loss, Test accuracy

    off = dict(ENV, XDG_CACHE_HOME=str(tmp_path / "off-cache"))
    train("--workdir", str(tmp_path / "a"), "--eval_only", "--no-compilation_cache", env=off)
    assert not entries(tmp_path / "off-cache" / "resnet_jax" / "xla")
    train("--workdir", str(tmp_path / "a"), "--eval_only", env=off)  # the control: this one keeps it
    assert entries(tmp_path / "off-cache" / "resnet_jax" / "xla")


def test_where_the_cache_lives():
    assert process.cache_home({"XDG_CACHE_HOME": "/x"}) == "/x/resnet_jax"
    assert process.cache_home({}).endswith(os.path.join(".cache", "resnet_jax"))
    assert process.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/resnet_jax/xla"
    assert process.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}) == "/j"
    assert process.compilation_cache_dir({"RESNET_JAX_COMPILATION_CACHE": "0"}) is None
    assert process.compilation_cache_dir({}, enabled=False) is None


def test_a_damaged_or_foreign_image_cache_entry_is_decoded_again(tmp_path, monkeypatch, capsys):
    """Decoded image folders: an entry with bytes flipped, truncated, replaced by a clean file of
    other images, or copied from another source is one warning line and decoded again; the run is
    the run of a fresh cache."""
    import tarfile

    import numpy as np
    from image_files import write_folder

    import resnet_jax as rj

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archives = []
    for name, seed in (("pets", 0), ("other", 1)):
        write_folder(tmp_path / name, np.random.default_rng(seed))
        archives.append(str(tmp_path / f"{name}.tar.gz"))
        with tarfile.open(archives[-1], "w:gz") as tar:
            tar.add(tmp_path / name, arcname=name)
    pets, other = archives
    tiny = ["--num_filters", "4", "--stage_sizes", "1,1,1", "--batch_size", "5", "--epochs", "1"]
    train("--workdir", str(tmp_path / "fresh"), "--data_dir", pets, *tiny)  # decodes into the cache
    fresh = rj.load_dataset(data_dir=pets)
    rj.load_dataset(data_dir=other)
    folder = tmp_path / "cache" / "resnet_jax" / "images"
    entries = sorted(os.listdir(folder), key=lambda n: (folder / n).stat().st_mtime_ns)
    entry, foreign = folder / entries[0], folder / entries[1]  # pets decoded first, then other
    good = entry.read_bytes()

    def flipped(data):
        data = bytearray(data)
        for k in range(len(data) // 2, len(data) // 2 + 8):
            data[k] ^= 0xFF
        return bytes(data)

    ten = tmp_path / "ten.npz"
    np.savez(ten, train_images=fresh.train_images[:10], train_labels=fresh.train_labels[:10])
    damage = {
        "flipped": flipped(good),
        "truncated": good[: len(good) // 2],
        "other images": ten.read_bytes(),
        "another source's entry": foreign.read_bytes(),
    }
    capsys.readouterr()
    for what, data in damage.items():
        entry.write_bytes(data)
        if what == "flipped":  # through train.py, as the user met it
            proc = train("--workdir", str(tmp_path / "w"), "--data_dir", pets, *tiny, check=False)
            lines = stderr_lines(proc)
            assert proc.returncode == 0 and len(lines) == 1 and "decoding them again" in lines[0], proc.stderr
            assert without_seconds(metrics(tmp_path / "w")) == without_seconds(metrics(tmp_path / "fresh"))
        else:
            ds = rj.load_dataset(data_dir=pets)
            lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert len(lines) == 1 and "damaged" in lines[0] and "decoding them again" in lines[0], (
                what,
                lines,
            )
            for field in ("train_images", "train_labels", "test_images", "test_labels"):
                np.testing.assert_array_equal(getattr(ds, field), getattr(fresh, field))
        assert entry.read_bytes() != data  # rewritten: the next load is clean
        rj.load_dataset(data_dir=pets)
        assert not capsys.readouterr().err.strip()
