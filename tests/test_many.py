"""Many runs from one command (train.py --seeds, rj.train_many): each seed a complete run equal to
the single run of that seed, a summary, resume after a SIGKILL, and one-line refusals."""

import json
import os
import re
import signal

import numpy as np
import pytest
from conftest import (
    TINY,
    assert_refused,
    assert_same_run,
    metrics,
    start,
    train,
    wait_for,
    without_seconds,
)

import resnet_jax as rj


def seeds_flags(spec):
    """The multi-run of these tests: 3 epochs of the seeds `spec`, one after another."""
    return ["--epochs", "3", "--seeds", spec, "--workers", "1"]


def seeds(workdir, archive, spec="0,1"):
    """train.py's multi-run of `spec` (seeds_flags) on the tiny recipe."""
    return train("--workdir", workdir, "--data_dir", archive, *seeds_flags(spec), *TINY)


@pytest.fixture(scope="module")
def two_seeds(archive, tmp_path_factory):
    """`--seeds 0,1` of the tiny recipe, 3 epochs, uninterrupted; and `--seed 1` alone."""
    root = tmp_path_factory.mktemp("many")
    many = seeds(str(root / "many"), archive)
    train("--workdir", str(root / "single"), "--data_dir", archive, "--epochs", "3", "--seed", "1", *TINY)
    return many, str(root / "many"), str(root / "single")


@pytest.mark.slow
def test_each_seed_is_the_single_run_of_that_seed_bit_for_bit(two_seeds):
    _, workdir, single = two_seeds
    seed_1 = os.path.join(workdir, "seed_1")
    assert without_seconds(metrics(seed_1)) == without_seconds(metrics(single))
    assert_same_run(seed_1, single)  # latest params, statistics and Adam state, bit for bit
    with open(os.path.join(seed_1, "run.json")) as f:
        assert json.load(f)["config"]["seed"] == 1
    assert rj.restore(seed_1).config.seed == 1  # a seed's workdir stands alone
    assert metrics(os.path.join(workdir, "seed_0")) != metrics(seed_1)  # and the seeds differ


def test_the_summary_says_each_seed_and_mean_and_sd(two_seeds):
    proc, workdir, _ = two_seeds
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["seeds"] == [0, 1] and summary["n"] == 2
    for seed, accuracy in zip((0, 1), summary["test_accuracy"]):
        with open(os.path.join(workdir, f"seed_{seed}", "run.json")) as f:
            assert json.load(f)["test"]["accuracy"] == accuracy
    assert summary["mean"] == pytest.approx(np.mean(summary["test_accuracy"]))
    assert summary["sd"] == pytest.approx(np.std(summary["test_accuracy"], ddof=1))
    assert {"best_val_acc", "best_epoch", "seconds", "test_loss"} <= set(summary["runs"][0])
    tail = proc.stdout.rstrip().splitlines()
    assert re.fullmatch(r"Test accuracy over 2 seeds: \d\.\d{4} ± \d\.\d{4} \(mean ± sd\)", tail[-1])
    assert tail[-3].split()[0] == "0" and tail[-2].split()[0] == "1"  # a row per seed
    with open(os.path.join(workdir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_same_command_again_trains_nothing(two_seeds, archive):
    _, workdir, _ = two_seeds
    before = sorted(os.listdir(os.path.join(workdir, "seed_0", "checkpoints")))
    out = seeds(workdir, archive, "0-1").stdout
    assert out.count("is finished") == 2 and "Epoch 1/3" not in out and "± " in out
    assert sorted(os.listdir(os.path.join(workdir, "seed_0", "checkpoints"))) == before


@pytest.mark.slow
def test_a_sigkill_then_the_same_command_ends_as_an_uninterrupted_multi_run(two_seeds, archive, tmp_path):
    _, reference, _ = two_seeds
    workdir = str(tmp_path / "many")
    proc = start(workdir, archive, *seeds_flags("0,1"))
    second = os.path.join(workdir, "seed_1", "metrics.jsonl")
    assert wait_for(lambda: os.path.exists(second))  # seed 0 done, seed 1 started
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = seeds(workdir, archive).stdout
    assert "is finished" in out  # seed 0 is not trained again
    for seed in (0, 1):
        assert_same_run(os.path.join(workdir, f"seed_{seed}"), os.path.join(reference, f"seed_{seed}"))


def test_refusals_are_one_line_and_write_nothing(two_seeds, full_run, archive, tmp_path):
    _, multi, _ = two_seeds
    _, single = full_run
    cases = [
        (str(tmp_path / "a"), ["--seeds", "0,1", "--seed", "2"], "--seeds and --seed"),
        (str(tmp_path / "b"), ["--seeds", "1,1"], "seed 1 is given twice"),
        (str(tmp_path / "c"), ["--seeds", "-1"], "seeds must be 0 or more"),
        (str(tmp_path / "d"), ["--seeds", ","], "names no seed"),
        (single, ["--seeds", "0,1"], "holds a single run"),
        (multi, [], "holds a multi-run (seeds 0,1); rerun it with --seeds 0,1"),
        (multi, ["--seeds", "0,1", "--num_filters", "8"], "seeds of another recipe: num_filters 4 (now 8)"),
    ]
    for workdir, extra, message in cases:
        assert_refused(workdir, ["--data_dir", archive, "--epochs", "3", *TINY, *extra], message)


def test_the_picture_of_many_runs_reads_with_one_epoch_and_the_table_lines_up():
    from resnet_jax.runs.console import table
    from resnet_jax.runs.plots import curves_figure

    runs = [[{"epoch": 1, "val_acc": 0.5}], [{"epoch": 1, "val_acc": 0.7}]]  # one epoch each
    ax = curves_figure([("mean of the seeds", runs)], "val_acc of 2 seeds").axes[0]
    assert ax.get_lines() and all(line.get_marker() not in (None, "", "None") for line in ax.get_lines())
    assert ax.collections  # the ± sd band
    assert all(float(t).is_integer() for t in ax.get_xticks())  # whole epochs
    lines = table(
        ("seed", "test_acc", "best_val_acc (epoch)"),
        [(0, "0.5000", "0.5000 (1)"), (12, "0.7", "0.7000 (12)")],
    )
    assert len({len(line) for line in lines}) == 1  # every column ends where its header ends
    assert lines[2].endswith("0.7000 (12)") and lines[1].endswith(" 0.5000 (1)")
