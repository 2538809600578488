"""train.py end to end on a small official-layout archive: console story, files, resume, errors."""

import os
import re

import pytest
from conftest import TINY, metrics, train

import resnet_jax as rj


def test_console_story_like_the_seed_log(full_run):
    proc, _ = full_run
    out = proc.stdout
    for epoch in (1, 2, 3):
        assert f"Epoch {epoch}/3\nLearning rate: 0.001\n" in out
    lines = re.findall(
        r"^6/6 \[=+\] - \d+s \d+ms/step - loss: \d\.\d{4} - acc: \d\.\d{4} - "
        r"val_loss: \d\.\d{4} - val_acc: \d\.\d{4}$",
        out,
        re.M,
    )
    assert len(lines) == 3
    assert re.search(r"^Epoch 00001: val_acc improved from -inf to \d\.\d{5}, saving model to ", out, re.M)
    assert (
        len(re.findall(r"^Epoch 0000[23]: val_acc (improved from|did not improve from) \d\.\d{5}", out, re.M))
        == 2
    )
    assert re.search(r"^Test loss: [\d.]+\nTest accuracy: [\d.]+$", out, re.M)
    assert "\r" not in out  # no progress bar when stdout is not a terminal


def test_metrics_checkpoints_and_pictures(full_run):
    proc, workdir = full_run
    rows = metrics(workdir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "lr", "loss", "acc", "val_loss", "val_acc", "seconds", "val_on"}
    assert all(
        r["val_on"] == "test" and r["lr"] == 0.001 and 0 <= r["val_acc"] <= 1 and r["loss"] > 0 for r in rows
    )
    test_acc = float(re.search(r"Test accuracy: ([\d.]+)", proc.stdout).group(1))
    assert test_acc == pytest.approx(rows[-1]["val_acc"])  # of the final model, as in the seed
    with open(os.path.join(workdir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "tensorboard")))
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == 3 * 6  # latest kept
    best_epoch = max(range(3), key=lambda i: (rows[i]["val_acc"], -i)) + 1
    assert best_epoch * 6 in steps  # best kept


@pytest.mark.slow
def test_eval_only_reproduces_the_best_epoch(full_run, archive):
    _, workdir = full_run
    rows = metrics(workdir)
    best = max(r["val_acc"] for r in rows)
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only").stdout
    assert float(re.search(r"Test accuracy: ([\d.]+)", out).group(1)) == pytest.approx(best)
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only", "--which", "latest").stdout
    assert float(re.search(r"Test accuracy: ([\d.]+)", out).group(1)) == pytest.approx(rows[-1]["val_acc"])


# A SIGKILL after the first epoch, resumed to the same result: test_survive.py's phases test.


def test_finished_run_says_so_and_other_models_are_refused(full_run, archive):
    _, workdir = full_run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    out = train("--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY).stdout
    assert "is finished" in out
    args = ["--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY]
    args[args.index("--num_filters") + 1] = "8"
    proc = train(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "different model" in proc.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_help_lists_every_config_field_with_defaults():
    import dataclasses

    import resnet_jax as rj

    out = train("--help").stdout
    fields = [f.name for f in dataclasses.fields(rj.Config)]
    assert len(fields) >= 25
    for field in fields + ["eval_only", "which", "workdir"]:
        assert f"--{field}" in out, field
    assert "(default: 50)" in out and "3,3,2" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--stage_sizes", "a,b"], "comma-separated ints"),
        (["--which", "best"], "--which applies only with --eval_only"),
        (["--dtype", "float16"], "dtype must be one of"),
        (["--workdir", "/proc/no/such/dir"], "cannot create workdir"),
        (["--eval_only"], "holds no resnet_jax run"),
        (["--dataset", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
        (["--batch_size", "1000"], "larger than the 96 training images"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, archive, tmp_path):
    base = ["--workdir", str(tmp_path / "w"), "--data_dir", archive, *TINY]
    proc = train(*base, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_workdir_that_is_a_file(tmp_path, archive):
    f = tmp_path / "file"
    f.write_text("precious")
    proc = train("--workdir", str(f), "--data_dir", archive, *TINY, check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr
    assert f.read_text() == "precious"


def test_the_caches_are_shown_and_cleared_from_the_command_line_and_python(tmp_path, monkeypatch):
    from conftest import run_main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    for folder, name, size in (("images", "a.npz", 3000), ("xla", "jit_f-1", 1000), ("xla", "jit_g-2", 500)):
        os.makedirs(tmp_path / "resnet_jax" / folder, exist_ok=True)
        (tmp_path / "resnet_jax" / folder / name).write_bytes(b"x" * size)
    found = rj.caches()
    assert (found["images"]["bytes"], found["images"]["files"]) == (3000, 1)
    assert (found["compiled"]["bytes"], found["compiled"]["files"]) == (1500, 2)
    shown = run_main(["--cache"])
    assert shown.returncode == 0 and str(tmp_path / "resnet_jax") in shown.stdout
    assert "decoded images" in shown.stdout and "in 1 files" in shown.stdout and "in 2 files" in shown.stdout
    cleared = run_main(["--cache", "clear"])
    assert cleared.returncode == 0 and "4.5 kB freed" in cleared.stdout
    assert rj.caches()["images"]["files"] == 0 == rj.caches()["compiled"]["files"]
    assert rj.clear_caches() == 0
    assert run_main(["--cache", "bogus"]).returncode == 2
