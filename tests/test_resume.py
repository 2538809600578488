"""A user's run resumed: settings that may and may not change on resume, damaged checkpoints, and
every bad input of the README through train.py on a run to resume (moved out of test_trust.py,
so that the two test workers share the load)."""

import json
import os
import re
import shutil

import pytest
from conftest import (
    TINY,
    assert_same_run,
    checkpoint_bytes,
    metrics,
    random_dataset,
    run_json,
    stderr_lines,
    train,
    train_on,
)

import resnet_jax as rj


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # the console says when in run.json's terms: after 2 epochs
    assert re.search(r"Settings changed after epoch 2: .*learning_rate 0.001 -> 0.0005", out.stdout)
    assert "Learning rate: 0.0005" in out.stdout
    changes = run_json(resumed)["changes"]
    assert changes[-1]["epoch"] == 2 and changes[-1]["settings"]["learning_rate"] == [0.001, 0.0005]
    train("--workdir", reference, "--data_dir", archive, "--epochs", "3", "--learning_rate", "5e-4", *TINY)
    assert "learning_rate" not in run_json(reference)["changes"][-1]["settings"]
    assert metrics(resumed)[:2] == metrics(two_epochs)  # the epochs before the change are kept
    assert_same_run(resumed, reference)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "deleted", "garbage"])
def test_a_damaged_best_names_the_readable_latest(two_epochs, archive, tmp_path, how):
    workdir = copy_run(two_epochs, tmp_path)
    best, latest = best_and_latest(workdir)
    # the run is deterministic: its best is an older epoch than its latest, two distinct checkpoints
    assert best < latest, (best, latest)
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


@pytest.mark.slow
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


# The README's bad-input table, through the command line ------------------------------------------

BAD = [  # (extra args, what stderr says); each run on a copy of a 2-epoch run
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--stage_sizes", "a,b"], "comma-separated ints"),
    (["--which", "best"], "--which applies only with --eval_only"),
    (["--quiet", "--verbose", "1"], "contradict"),
    (["--dtype", "float16"], "dtype must be one of"),
    (["--dataset", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    (["--batch_size", "1000"], "larger than the 96 training images"),
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


@pytest.mark.slow
def test_a_resumed_epoch_counts_the_seconds_of_both_its_parts(tmp_path):
    """The seconds of an epoch stopped mid-way and resumed are the time of both parts, not of the
    resumed part alone (metrics.jsonl, the epoch line)."""
    import time

    from conftest import StopSoon

    from resnet_jax.checkpoint import Checkpoints

    ds = random_dataset(n_train=64, n_test=16)
    config = rj.presets.tiny(batch_size=8, epochs=1, steps_per_call=1)
    workdir = str(tmp_path / "w")
    with pytest.raises(rj.Interrupted):
        rj.train_and_evaluate(config, workdir, ds, verbosity=0, stop=StopSoon())
    with Checkpoints(workdir, read_only=True) as ckpts:
        before = ckpts.read_meta(ckpts.steps()[-1])["partial_seconds"]
    assert before > 0
    began = time.monotonic()
    _, history = rj.train_and_evaluate(config, workdir, ds, verbosity=0)
    resumed = time.monotonic() - began  # the rest of the epoch, its evaluation, and the start
    assert before <= history[0]["seconds"] <= before + resumed
