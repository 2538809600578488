"""A user's second and third run: changed settings on resume, damaged checkpoints, in-memory
data, start-up lines, clean streams, and every bad input of the README through train.py."""

import hashlib
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from conftest import TINY, Lines, assert_same_run, metrics, random_dataset, start, train, train_on, wait_for

import resnet_jax as rj
from resnet_jax import report


def run_json(workdir):
    with open(os.path.join(workdir, "run.json")) as f:
        return json.load(f)


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


def checkpoint_bytes(workdir):
    """A hash of every file under workdir/checkpoints (and its damaged-aside folder)."""
    h = hashlib.sha256()
    for folder in ("checkpoints", "checkpoints.damaged"):
        for root, dirs, files in sorted(os.walk(os.path.join(workdir, folder))):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def two_epochs(archive, tmp_path_factory):
    """A finished 2-epoch tiny run to copy and resume."""
    workdir = str(tmp_path_factory.mktemp("two") / "w")
    train("--workdir", workdir, "--data_dir", archive, "--epochs", "2", *TINY)
    return workdir


def copy_run(src, tmp_path, name="w"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# 1. Settings that change on resume -------------------------------------------------------------


def test_nan_advice_without_a_checkpoint_can_be_followed(archive, tmp_path):
    workdir = str(tmp_path / "w")
    proc = train("--workdir", workdir, "--data_dir", archive, "--learning_rate", "1e30", *TINY, check=False)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1, proc.stderr
    assert "no checkpoint was saved yet" in proc.stderr and "lower --learning_rate" in proc.stderr
    assert "intact" not in proc.stderr  # names only checkpoints that exist
    rerun = train(
        "--workdir", workdir, "--data_dir", archive, "--learning_rate", "1e-3", "--epochs", "1", *TINY
    )
    assert "Test accuracy" in rerun.stdout


def test_changed_learning_rate_on_resume_equals_a_fresh_run_from_that_state(two_epochs, archive, tmp_path):
    resumed = copy_run(two_epochs, tmp_path, "resumed")
    reference = copy_run(two_epochs, tmp_path, "reference")
    # the reference: the same state, as if its run had always had the new rate
    info = run_json(reference)
    info["config"]["learning_rate"] = 5e-4
    with open(os.path.join(reference, "run.json"), "w") as f:
        json.dump(info, f)
    out = train(
        "--workdir", resumed, "--data_dir", archive, "--epochs", "3", "--learning_rate", "5e-4", *TINY
    )
    assert "Resuming" in out.stdout
    # the console says when in run.json's terms: after 2 epochs (issue 33)
    assert re.search(r"Settings changed after epoch 2: .*learning_rate 0.001 -> 0.0005", out.stdout)
    assert "Learning rate: 0.0005" in out.stdout
    changes = run_json(resumed)["changes"]
    assert changes[-1]["epoch"] == 2 and changes[-1]["settings"]["learning_rate"] == [0.001, 0.0005]
    train("--workdir", reference, "--data_dir", archive, "--epochs", "3", "--learning_rate", "5e-4", *TINY)
    assert "learning_rate" not in run_json(reference)["changes"][-1]["settings"]
    assert metrics(resumed)[:2] == metrics(two_epochs)  # the epochs before the change are kept
    assert_same_run(resumed, reference)


def test_augmentation_and_adam_settings_may_change_but_not_the_model_or_seed(two_epochs, archive, tmp_path):
    workdir = copy_run(two_epochs, tmp_path)
    out = train_on(
        workdir,
        archive,
        *"--epochs 3 --shift_range 0.05 --no-flip --adam_eps 1e-6 --l2_weight 2e-4".split(),
        *TINY,
    )
    settings = run_json(workdir)["changes"][-1]["settings"]
    assert set(settings) == {"epochs", "shift_range", "flip", "adam_eps", "l2_weight"}
    assert "shift_range 0.1 -> 0.05" in out.stdout and "flip True -> False" in out.stdout
    before = checkpoint_bytes(workdir)
    for flag, value in (("--seed", "1"), ("--num_filters", "8"), ("--batch_size", "8")):
        args = ["--workdir", workdir, "--data_dir", archive, "--epochs", "4", *TINY, flag, value]
        proc = train(*args, check=False)
        assert proc.returncode == 2 and len(stderr_lines(proc)) == 1 and flag[2:] in proc.stderr
    assert checkpoint_bytes(workdir) == before


# 2. Damaged checkpoints ------------------------------------------------------------------------


def damage(step_dir, how):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    big = max(files, key=os.path.getsize)
    if how == "truncated":
        with open(big, "r+b") as f:
            f.truncate(os.path.getsize(big) // 3)
    elif how == "deleted":
        os.remove(big)
    else:  # garbage
        with open(big, "wb") as f:
            f.write(os.urandom(os.path.getsize(big) or 64))


def steps_of(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def best_and_latest(workdir):
    best = rj.checkpoint.restore_with_meta(workdir, "best")[2]
    return best, steps_of(workdir)[-1]


@pytest.mark.parametrize("how", ["truncated", "deleted", "garbage"])
def test_a_damaged_best_names_the_readable_latest(two_epochs, archive, tmp_path, how):
    workdir = copy_run(two_epochs, tmp_path)
    best, latest = best_and_latest(workdir)
    if best == latest:  # make the best an older epoch: damage needs two distinct checkpoints
        pytest.skip("best is the latest in this run")
    damage(os.path.join(workdir, "checkpoints", str(best)), how)
    proc = train("--workdir", workdir, "--data_dir", archive, "--eval_only", check=False)
    assert proc.returncode == 2 and len(stderr_lines(proc)) == 1, proc.stderr
    assert "--which latest" in proc.stderr and "epoch 2" in proc.stderr and "Traceback" not in proc.stderr
    assert "bound method" not in proc.stderr and "pybind" not in proc.stderr
    ok = train("--workdir", workdir, "--data_dir", archive, "--eval_only", "--which", "latest")
    assert f"Evaluating the latest checkpoint of {workdir}: epoch 2 (step {latest})" in ok.stdout


@pytest.mark.parametrize("how", ["truncated", "deleted", "garbage"])
def test_every_checkpoint_damaged_is_a_few_lines(two_epochs, archive, tmp_path, how):
    workdir = copy_run(two_epochs, tmp_path)
    for step in steps_of(workdir):
        damage(os.path.join(workdir, "checkpoints", str(step)), how)
    before = checkpoint_bytes(workdir)
    proc = train("--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY, check=False)
    assert proc.returncode == 2 and len(stderr_lines(proc)) <= 2, proc.stderr
    assert "no readable latest checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert checkpoint_bytes(workdir) == before  # nothing deleted or rewritten


def test_a_damaged_latest_is_set_aside_and_replaced(full_run, archive, tmp_path):
    _, reference = full_run
    workdir = copy_run(reference, tmp_path)
    latest = steps_of(workdir)[-1]
    damage(os.path.join(workdir, "checkpoints", str(latest)), "truncated")
    proc = train("--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY)
    assert len(stderr_lines(proc)) == 1 and "unreadable" in proc.stderr and "moved to" in proc.stderr
    assert latest in steps_of(workdir)  # replaced by a fresh save of the same step
    assert os.listdir(os.path.join(workdir, "checkpoints.damaged"))  # kept, out of the way
    assert_same_run(workdir, reference)
    assert (
        "unreadable"
        not in train("--workdir", workdir, "--eval_only", "--which", "latest", "--data_dir", archive).stderr
    )


# 3-5. Data ---------------------------------------------------------------------------------------


def test_in_memory_arrays_are_recorded_and_the_command_line_says_what_to_do(tmp_path):
    rng = np.random.default_rng(0)
    ds = rj.Dataset(
        rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
        rng.integers(0, 10, 40),
        rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
        rng.integers(0, 10, 16),
    )
    workdir = str(tmp_path / "w")
    rj.train_and_evaluate(rj.tiny(batch_size=8, epochs=1), workdir, ds, verbosity=0)
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
        rj.train_and_evaluate(rj.tiny(batch_size=8, epochs=2), workdir, other, verbosity=0)


def test_channels_first_arrays_are_refused_with_the_fix():
    x = np.zeros((4, 3, 32, 32), np.uint8)
    with pytest.raises(rj.UserError, match=r"channels-first.*np.transpose\(train_images, \(0, 2, 3, 1\)\)"):
        rj.Dataset(x, np.zeros(4, int), x, np.zeros(4, int))


def test_augment_refuses_uint8_images():
    config = rj.Config()
    with pytest.raises(rj.UserError, match="augment takes float images"):
        rj.augment(jax.random.key(0), np.zeros((2, 32, 32, 3), np.uint8), config)
    out = rj.augment(jax.random.key(0), np.zeros((2, 32, 32, 3), np.float32), config)
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
        "100 train / 40 test images of 32x32x3, 10 classes",
        "Model: ResNet v1, 4 filters, blocks 1,1,1:",
        "parameters +",
        "Devices: 1 x cpu (cpu), batch 16 (16 per device), float32",
        "Steps per epoch: 7; workdir",
        "Compiling the train step",
        "Compiled in",
    ):
        assert expected in head, head


def test_summary_prints_a_layer_table(archive, tmp_path):
    out = train(
        "--workdir", str(tmp_path / "w"), "--data_dir", archive, "--epochs", "1", "--summary", *TINY
    ).stdout
    head = out[: out.index("Epoch 1/1")]
    assert "stage3_block1" in head and "conv_init" in head and "Total Parameters" in head


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
    assert " 2s 20ms/step " in report.epoch_line(1000, rec, steps_run=100)
    assert " 2s 2ms/step " in report.epoch_line(1000, rec)


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


def test_eval_only_names_the_checkpoint(full_run, archive):
    _, workdir = full_run
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only").stdout
    assert re.search(rf"Evaluating the best checkpoint of {re.escape(workdir)}: epoch \d \(step \d+\)", out)
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only", "--which", "latest").stdout
    assert f"Evaluating the latest checkpoint of {workdir}: epoch 3 (step 21)" in out


def test_eval_only_says_when_a_state_is_mid_epoch(archive, tmp_path):
    workdir = str(tmp_path / "w")
    proc = start(workdir, archive, "--epochs", "3", "--steps_per_call", "1", "--batch_size", "2")
    out = Lines(proc)
    assert wait_for(lambda: out.seen("Epoch 2/3"))  # epoch 2 is starting: the stop lands in it
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out.thread.join()
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only", "--which", "latest").stdout
    assert re.search(r"latest checkpoint of .*: epoch 2, step \d+ \(step \d+, mid-epoch\)", out), out
    assert (
        "Resuming"
        in train_on(
            workdir, archive, "--epochs", "3", *TINY, *"--steps_per_call 1 --batch_size 2".split()
        ).stdout
    )


# The README's bad-input table, through the command line ------------------------------------------

BAD = [  # (extra args, what stderr says); each run on a copy of a 2-epoch run
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--stage_sizes", "a,b"], "comma-separated ints"),
    (["--which", "best"], "--which applies only with --eval_only"),
    (["--quiet", "--verbose", "1"], "contradict"),
    (["--dtype", "float16"], "dtype must be one of"),
    (["--dataset", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    (["--batch_size", "1000"], "larger than the 100 training images"),
    (["--num_filters", "8"], "different model"),
    (["--seed", "3"], "different data or seed"),
    (["--data_dir", "/no/such/dir"], "does not exist"),
    (["--cpu_devices", "many"], "cpu_devices must be"),
    (["--lr", "0.1"], "unrecognized arguments: --lr"),
    (["--process_id", "5", "--num_processes", "2"], "out of range"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_every_bad_input_is_a_few_lines_exit_2_and_keeps_the_checkpoints(
    two_epochs, archive, tmp_path, extra, message
):
    workdir = copy_run(two_epochs, tmp_path)
    before = checkpoint_bytes(workdir)
    args = ["--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY]
    if "--data_dir" in extra:
        args = [a for a in args if a != archive and a != "--data_dir"]
    proc = train(*args, *extra, check=False)
    lines = stderr_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert 1 <= len(lines) <= 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert checkpoint_bytes(workdir) == before
