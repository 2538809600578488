"""A user's second and third run: in-memory data, foreign files, start-up lines, clean streams, and
what a stop request does (changed settings on resume, damaged checkpoints and the README's bad
inputs: test_resume.py)."""

import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from conftest import (
    TINY,
    Lines,
    metrics,
    random_dataset,
    run_json,
    start,
    stderr_lines,
    train,
    train_on,
    wait_for,
)

import resnet_jax as rj
from resnet_jax.runs import console

# 3-5. Data ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_in_memory_arrays_are_recorded_and_the_command_line_says_what_to_do(tmp_path):
    ds = random_dataset(n_train=40, n_test=16, shape=(28, 28, 1))
    workdir = str(tmp_path / "w")
    rj.train_and_evaluate(rj.presets.tiny(batch_size=8, epochs=1), workdir, ds, verbosity=0)
    data = run_json(workdir)["data"]
    assert (data["source"], data["train"], data["test"], data["image_shape"]) == (
        "arrays",
        40,
        16,
        [28, 28, 1],
    )
    assert data["fingerprint"] == ds.fingerprint() and len(data["fingerprint"]) == 16
    proc = train("--workdir", workdir, "--eval_only", check=False)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1 and "in-memory arrays" in proc.stderr
    with pytest.raises(rj.UserError, match=r"\(28, 28, 1\).*\(32, 32, 3\)"):
        rj.evaluate_checkpoint(workdir, dataset=random_dataset())
    other = rj.Dataset(ds.train_images[::-1].copy(), ds.train_labels, ds.test_images, ds.test_labels)
    with pytest.raises(rj.UserError, match="other data"):
        rj.train_and_evaluate(rj.presets.tiny(batch_size=8, epochs=2), workdir, other, verbosity=0)


def test_channels_first_arrays_are_refused_with_the_fix():
    x = np.zeros((4, 3, 32, 32), np.uint8)
    with pytest.raises(rj.UserError, match=r"channels-first.*np.transpose\(train_images, \(0, 2, 3, 1\)\)"):
        rj.Dataset(x, np.zeros(4, int), x, np.zeros(4, int))


def test_augment_refuses_uint8_images():
    config = rj.Config()
    with pytest.raises(rj.UserError, match="augment takes float images"):
        rj.model.augment.augment(jax.random.key(0), np.zeros((2, 32, 32, 3), np.uint8), config)
    out = rj.model.augment.augment(jax.random.key(0), np.zeros((2, 32, 32, 3), np.float32), config)
    assert out.dtype == np.float32


# 6. Foreign files --------------------------------------------------------------------------------


def test_a_foreign_metrics_file_is_refused_and_untouched(archive, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("my own notes\n")
    proc = train("--workdir", str(workdir), "--data_dir", archive, *TINY, check=False)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1 and "did not write" in proc.stderr
    assert (workdir / "metrics.jsonl").read_text() == "my own notes\n"
    assert sorted(os.listdir(workdir)) == [".lock", "metrics.jsonl"]


# 7-8. What is said, and when ---------------------------------------------------------------------


def test_start_up_says_what_will_run_before_epoch_1(full_run):
    out = full_run[0].stdout
    head = out[: out.index("Epoch 1/3")]
    for expected in (
        "Data: cifar10 (archive:",
        "96 train / 40 test images of 32x32x3, 10 classes",
        "Model: ResNet v1, 4 filters, blocks 1,1,1:",
        "parameters +",
        "Devices: 1 x cpu (cpu), batch 16 (16 per device), float32",
        "Steps per epoch: 6; workdir",
        "Compiling the train step",
        "Compiled in",
    ):
        assert expected in head, head


@pytest.mark.slow
def test_summary_prints_a_layer_table(archive, tmp_path):
    out = train(
        "--workdir", str(tmp_path / "w"), "--data_dir", archive, "--epochs", "1", "--summary", *TINY
    ).stdout
    head = out[: out.index("Epoch 1/1")]
    assert "stage3_block1" in head and "conv_init" in head and "Total Parameters" in head


@pytest.mark.slow
def test_a_stop_request_acts_within_seconds_on_the_cpu(archive, tmp_path):
    workdir = str(tmp_path / "w")
    proc = start(
        workdir,
        archive,
        "--epochs",
        "50",
        "--steps_per_call",
        "100",
        tiny=["--num_filters", "16", "--stage_sizes", "2,2,2", "--batch_size", "16"],
    )
    out = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        out.append(line)
        if line.startswith("Epoch 2/") or not line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(out)
    # within a device call (paced to about 0.5 s, never over --steps_per_call 100 steps), a save
    # and the exit: 5 s, plus the longest call at the step time the run itself measured (a loaded
    # machine makes slower steps, not a later stop)
    ms = max(int(m) for m in re.findall(r"(\d+)ms/step", "".join(out)))
    assert time.monotonic() - sent < 5 + 100 * ms / 1000


def test_ms_per_step_counts_only_the_steps_run():
    rec = {"epoch": 1, "loss": 1.0, "acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "seconds": 2.0}
    assert " 2s 20ms/step " in console.epoch_line(1000, rec, steps_run=100)
    assert " 2s 2ms/step " in console.epoch_line(1000, rec)


# 9-11. Streams, help, TensorBoard, --eval_only -----------------------------------------------------


def test_restore_prints_nothing(full_run, capfd):
    _, workdir = full_run
    rj.restore(workdir, "latest")
    rj.restore(workdir, "best")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_help_says_each_default_once():
    out = train("--help").stdout
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "(default best)" not in out and out.count("(default: 50)") == 1
    assert "--which {best,latest}" in out and "3,3,2" in out


def test_tensorboard_event_files_load(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, workdir = full_run
    events = EventAccumulator(os.path.join(workdir, "tensorboard"))
    events.Reload()
    assert {"loss", "acc", "val_loss", "val_acc", "lr", "seconds"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2, 3]
    rows = metrics(workdir)
    np.testing.assert_allclose(
        [e.value for e in events.Scalars("val_acc")], [r["val_acc"] for r in rows], rtol=1e-6
    )
    assert shutil.which("tensorboard") or os.path.exists(
        os.path.join(os.path.dirname(os.sys.executable), "tensorboard")
    )


@pytest.mark.slow
def test_eval_only_names_the_checkpoint(full_run, archive):
    _, workdir = full_run
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only").stdout
    assert re.search(rf"Evaluating the best checkpoint of {re.escape(workdir)}: epoch \d \(step \d+\)", out)
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only", "--which", "latest").stdout
    assert f"Evaluating the latest checkpoint of {workdir}: epoch 3 (step 18)" in out


@pytest.mark.slow
def test_eval_only_says_when_a_state_is_mid_epoch(archive, tmp_path):
    workdir = str(tmp_path / "w")
    proc = start(workdir, archive, "--epochs", "3", "--steps_per_call", "1", "--batch_size", "2")
    out = Lines(proc)
    assert wait_for(lambda: out.seen("Epoch 2/3"))  # epoch 2 is starting: the stop lands in it
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out.thread.join()
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only", "--which", "latest").stdout
    assert re.search(r"latest checkpoint of .*: epoch 2, step \d+/48, mid-epoch \(step \d+\)", out), out
    assert (
        "Resuming"
        in train_on(
            workdir, archive, "--epochs", "3", *TINY, *"--steps_per_call 1 --batch_size 2".split()
        ).stdout
    )
