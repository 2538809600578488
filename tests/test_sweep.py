"""Sweeps (train.py --sweep, rj.sweep): every setting x seed a complete run equal to its single
run, a summary whose statistics are those of its runs, rerun / extend / SIGKILL, many processes on
one sweep (locks, static shards), every refusal, and the notebook call."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import (
    ENV,
    ROOT,
    TINY,
    assert_refused,
    assert_same_run,
    folder_hash,
    metrics,
    random_dataset,
    run_json,
    start,
    train,
    wait_for,
)
from own_parts import CNN, sgd_cosine

import resnet_jax as rj
from resnet_jax import flags, tuning
from resnet_jax.runs import summary as summaries

# One after another (--workers 1): these tests are about a sweep's runs, claims and files;
# tests/test_workers.py trains them at once.
SWEEP = ["--sweep", "learning_rate=0.001,0.003", "--seeds", "0,1", "--epochs", "2", "--workers", "1"]
SETTINGS = ("learning_rate=0.001", "learning_rate=0.003")


@pytest.fixture(scope="module")
def swept(archive, tmp_path_factory):
    """2 learning rates x 2 seeds of the tiny recipe, 2 epochs; and one of its runs alone."""
    root = tmp_path_factory.mktemp("sweep")
    proc = train("--workdir", str(root / "w"), "--data_dir", archive, *TINY, *SWEEP)
    single = ["--epochs", "2", "--learning_rate", "0.003", "--seed", "1"]
    train("--workdir", str(root / "single"), "--data_dir", archive, *TINY, *single)
    return proc, str(root / "w"), str(root / "single")


def read(workdir, name="summary.json"):
    """A run's run.json (resnet_jax's reader), or a sweep's summary.json or runs.json."""
    if name == "run.json":
        return run_json(workdir)
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


@pytest.mark.slow
def test_a_run_of_the_grid_is_its_single_run_bit_for_bit(swept):
    _, workdir, single = swept
    assert set(os.listdir(workdir)) >= {*SETTINGS, "runs.json", "summary.json", "curves.png"}
    run = os.path.join(workdir, "learning_rate=0.003", "seed_1")
    assert_same_run(run, single)  # metrics, latest params, statistics and Adam state
    state = rj.restore(run)  # a run of the sweep stands alone
    assert state.config.learning_rate == 0.003 and state.config.seed == 1
    assert metrics(os.path.join(workdir, SETTINGS[0], "seed_1")) != metrics(run)


def test_welchs_interval_is_scipys_with_fixed_numbers():
    from scipy import stats

    a, b = [0.41, 0.45, 0.43], [0.47, 0.52, 0.46, 0.50]
    low, high = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    found = summaries.welch(a, b)
    assert found["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert found["ci95"] == pytest.approx([low, high])
    # Welch's formula by hand: se^2 = 0.0004/3 + 0.000758/4, df = 4.9965, t(0.975, df) = 2.5714
    assert found["ci95"] == pytest.approx([0.01130, 0.10370], abs=1e-5)
    assert found["df"] == pytest.approx(4.9965, abs=1e-4)
    assert summaries.welch([0.5, 0.5], [0.6, 0.6])["ci95"] == pytest.approx([0.1, 0.1])  # no spread: a point
    assert summaries.welch([0.5], [0.6, 0.7])["ci95"] is None  # one seed: no interval
    # One setting without spread: the other's alone (se^2 = 0.01/3, df = 2, t = 4.3027), and no
    # warning of scipy's about a cancellation reaches the user's console.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = summaries.welch([0.2, 0.2, 0.2], [0.1, 0.3, 0.2])
    assert found["ci95"] == pytest.approx([-0.24841, 0.24841], abs=1e-5)


def test_the_summary_holds_the_runs_statistics_and_a_choice_made_on_validation(swept):
    proc, workdir, _ = swept
    summary = read(workdir)
    assert [s["dir"] for s in summary["settings"]] == list(SETTINGS) and summary["complete"]
    tests = []
    for entry, rate in zip(summary["settings"], (0.001, 0.003)):
        assert entry["fields"] == {"learning_rate": rate} and entry["seeds"] == [0, 1]
        runs = [os.path.join(workdir, entry["dir"], f"seed_{s}") for s in (0, 1)]
        test = [read(r, "run.json")["test"]["accuracy"] for r in runs]
        val = [max(m["val_acc"] for m in metrics(r)) for r in runs]
        assert entry["test_accuracy"]["mean"] == pytest.approx(np.mean(test))
        assert entry["test_accuracy"]["sd"] == pytest.approx(np.std(test, ddof=1))
        assert entry["val_acc"]["mean"] == pytest.approx(np.mean(val))
        assert entry["val_acc"]["sd"] == pytest.approx(np.std(val, ddof=1))
        tests.append(test)
    versus = summary["settings"][1]["vs_first"]
    assert versus["diff"] == pytest.approx(np.mean(tests[1]) - np.mean(tests[0]))
    assert versus["ci95"] == pytest.approx(summaries.welch(tests[0], tests[1])["ci95"])  # its runs' interval
    assert "Welch" in summary["interval"] and "vs_first" not in summary["settings"][0]
    best = max(summary["settings"], key=lambda e: e["val_acc"]["mean"])
    chosen = summary["chosen"]
    assert (
        chosen["dir"] == best["dir"] and chosen["test_set_chose"] and chosen["validated_on"] == "the test set"
    )
    tail = proc.stdout.rstrip().splitlines()
    assert tail[-1].startswith("Best on validation") and "the test set chose it" in tail[-1]
    assert tail[-3].startswith(SETTINGS[0]) and tail[-2].startswith(SETTINGS[1]) and "[" in tail[-2]
    assert re.search(r"^setting\s+n\s+val_acc\s+test_acc\s+vs first", tail[-4])


@pytest.mark.slow
def test_rerun_trains_nothing_and_a_new_value_trains_only_its_runs(swept, archive, tmp_path):
    _, reference, _ = swept
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    before = folder_hash(os.path.join(workdir, SETTINGS[0]))
    out = train("--workdir", workdir, "--data_dir", archive, *TINY, *SWEEP).stdout
    assert out.count("is finished") == 4 and "Epoch 1/2" not in out
    assert folder_hash(os.path.join(workdir, SETTINGS[0])) == before
    grown = [a.replace("0.001,0.003", "0.001,0.003,0.01") for a in SWEEP]
    out = train("--workdir", workdir, "--data_dir", archive, *TINY, *grown).stdout
    assert out.count("Epoch 1/2") == 2 and out.count("is finished") == 4  # only the new value's runs
    summary = read(workdir)
    assert [s["dir"] for s in summary["settings"]] == [*SETTINGS, "learning_rate=0.01"] and summary[
        "complete"
    ]
    assert read(workdir, "runs.json")["grid"] == [["learning_rate", [0.001, 0.003, 0.01]]]


@pytest.mark.slow
def test_a_sigkill_then_the_same_command_ends_as_an_uninterrupted_sweep(swept, archive, tmp_path):
    _, reference, _ = swept
    workdir = str(tmp_path / "w")
    args = ["--sweep", "learning_rate=0.001,0.003", "--seeds", "0", "--epochs", "2", "--workers", "1"]
    proc = start(workdir, archive, *args)
    second = os.path.join(workdir, SETTINGS[1], "seed_0", "metrics.jsonl")
    assert wait_for(lambda: os.path.exists(second))  # the first run done, the second started
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = train("--workdir", workdir, "--data_dir", archive, *TINY, *args).stdout
    assert "is finished" in out  # the first run is not trained again
    for setting in SETTINGS:
        assert_same_run(os.path.join(workdir, setting, "seed_0"), os.path.join(reference, setting, "seed_0"))
    assert read(workdir)["complete"]


@pytest.mark.slow
def test_two_processes_share_one_sweep_each_run_trained_once(swept, archive, tmp_path):
    _, reference, _ = swept
    workdir = str(tmp_path / "w")
    procs = [start(workdir, archive, *SWEEP) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    printed = "".join(out for out, _ in outs)
    assert printed.count("Epoch 1/2") == 4  # four runs, each trained by one process
    for setting in SETTINGS:
        for seed in (0, 1):
            run = os.path.join(workdir, setting, f"seed_{seed}")
            assert_same_run(run, os.path.join(reference, setting, f"seed_{seed}"))
    assert read(workdir)["complete"]  # whichever process finished last wrote it whole


@pytest.mark.slow
def test_static_shards_split_the_runs(swept, archive, tmp_path):
    _, reference, _ = swept
    workdir = str(tmp_path / "w")
    first = train("--workdir", workdir, "--data_dir", archive, *TINY, *SWEEP, "--shard", "0/2").stdout
    assert first.count("Epoch 1/2") == 2 and not read(workdir)["complete"]
    assert "Runs still missing" in first
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert flags.parse_shard("slurm", env) == (1, 2) and flags.parse_shard("3/4") == (3, 4)
    second = train("--workdir", workdir, "--data_dir", archive, *TINY, *SWEEP, "--shard", "1/2").stdout
    assert second.count("Epoch 1/2") == 2 and read(workdir)["complete"]
    ran = re.findall(r"=== (learning_rate=[\d.]+, seed \d)", first) + re.findall(
        r"=== (learning_rate=[\d.]+, seed \d)", second
    )
    assert sorted(ran) == sorted(f"{s}, seed {seed}" for s in SETTINGS for seed in (0, 1))
    for setting in SETTINGS:
        assert_same_run(os.path.join(workdir, setting, "seed_1"), os.path.join(reference, setting, "seed_1"))


def test_refusals_are_one_line_exit_2_and_write_nothing(swept, archive, tmp_path):
    _, existing, _ = swept
    fresh = str(tmp_path / "new")
    cases = [
        (fresh, ["--sweep", "seed=1,2"], "seed cannot be swept: seeds are given with --seeds"),
        (fresh, ["--sweep", "workdir=a,b"], "'workdir' is not a setting"),
        (fresh, ["--sweep", "learnig_rate=0.1"], "did you mean learning_rate?"),
        (fresh, ["--sweep", "batch_size=0,16"], "batch_size must be a positive integer, got 0"),
        (fresh, ["--sweep", "learning_rate=abc"], "learning_rate takes a float, got 'abc'"),
        (fresh, ["--sweep", "learning_rate="], "give learning_rate one or more values"),
        (fresh, ["--sweep", "learning_rate=0.1,0.1"], "learning_rate=0.1 is given twice"),
        (fresh, ["--sweep", "learning_rate"], "no '='"),
        (fresh, ["--sweep", "flip=maybe"], "flip takes true or false"),
        (fresh, ["--sweep", "learning_rate=0.1", "--sweep", "learning_rate=0.2"], "swept twice"),
        (fresh, ["--sweep", "learning_rate=0.1", "--shard", "2/2"], "must be 0 to 1 of 2"),
        (fresh, ["--shard", "0/2"], "--shard splits the runs of --seeds or --sweep"),
        (fresh, ["--sweep", "stage_sizes=1,1,1"], "has ':' between its items: --sweep stage_sizes=1:1:1"),
        (fresh, ["--data_dir", os.path.join(ROOT, "README.md")], "is a file but not an archive"),
        (
            existing,
            ["--eval_only"],
            "holds a sweep (runs.json), not one run; name one of its runs, e.g. --workdir",
        ),
        (existing, [*SWEEP[2:], "--sweep", "num_filters=4,8"], "holds a sweep of learning_rate"),
        (
            existing,
            [*SWEEP[:4], "--bn_momentum", "0.9"],
            "a sweep of another recipe: bn_momentum 0.99 (now 0.9)",
        ),
    ]
    for workdir, extra, message in cases:
        assert_refused(workdir, ["--data_dir", archive, "--epochs", "2", *TINY, *extra], message)


@pytest.mark.slow
def test_the_notebook_sweep_and_train_many_with_your_own_parts(tmp_path):
    ds = random_dataset(n_train=32, n_test=16, shape=(16, 16, 1))
    seen = []
    own = dict(
        dataset=ds,
        model=CNN(),
        optimizer=sgd_cosine,
        callbacks=[lambda epoch, metrics, state: seen.append(epoch)],
        verbosity=0,
    )
    # train_many: the seeds of one recipe, each run's (state, history)
    results = rj.train_many(
        rj.presets.tiny(batch_size=8, epochs=2), str(tmp_path / "many"), seeds=[3, 5], **own
    )
    assert len(results) == 2 and seen == [1, 2, 1, 2]
    (state_3, history_3), (state_5, _) = results
    assert state_3.config.seed == 3 and len(history_3) == 2 and state_3.batch_stats == {}
    assert not np.array_equal(state_3.params["Dense_0"]["kernel"], state_5.params["Dense_0"]["kernel"])
    restored = rj.restore(str(tmp_path / "many" / "seed_5"), "latest", model=CNN())
    np.testing.assert_array_equal(restored.params["Dense_0"]["kernel"], state_5.params["Dense_0"]["kernel"])

    # sweep: settings x seeds, the summary returned
    seen.clear()
    config = rj.presets.tiny(batch_size=8, epochs=1)
    summary = rj.sweep(config, str(tmp_path / "w"), grid={"shift_range": [0.0, 0.1]}, seeds=[3, 5], **own)
    assert [s["dir"] for s in summary["settings"]] == ["shift_range=0.0", "shift_range=0.1"]
    assert all(s["seeds"] == [3, 5] for s in summary["settings"]) and len(seen) == 4
    state = rj.restore(str(tmp_path / "w" / "shift_range=0.1" / "seed_5"), "latest", model=CNN())
    assert state.config.shift_range == 0.1 and state.config.seed == 5 and state.batch_stats == {}
    with pytest.raises(rj.UserError, match="seed cannot be swept"):
        rj.sweep(config, str(tmp_path / "x"), grid={"seed": [1, 2]}, dataset=ds)
    assert not os.path.exists(tmp_path / "x")
    assert summaries.label({"stage_sizes": (3, 3, 2), "flip": False}) == "stage_sizes=3-3-2,flip=False"


TWO_MODELS = """
import json, sys, jax, resnet_jax as rj
from resnet_jax import tuning
from resnet_jax.model import resnet
data = rj.load_dataset(data_dir=sys.argv[1])
for filters, folder in ((16, "a"), (4, "b")):  # the larger first: it decides nothing for the next
    config = rj.Config(num_filters=filters, stage_sizes=(1, 1, 1), batch_size=16, steps_per_call=4,
                       epochs=1, seed=1)
    rj.train_and_evaluate(config, sys.argv[2] + "/" + folder, data, verbosity=0)
    if filters == 16:  # no configure call: the devices train.py would give the process and the run
        want = tuning.auto_cpu_devices(tuning.cores(), 16, resnet.step_flops(config))
        print(json.dumps([jax.device_count(), want]))
"""


@pytest.mark.slow
def test_runs_of_other_model_sizes_each_use_their_own_devices_in_any_process(archive, tmp_path):
    """The devices a run uses are its own decision: a sweep's small-model run, a notebook's second
    model and the same flags alone train on as many devices (recorded in run.json) and equal
    each other bit for bit; the larger model is split where the CPU has cores for it. A
    notebook's first run sets the process up as train.py does, without configure; a device
    count the user chose (JAX_NUM_CPU_DEVICES) wins."""
    flags = ["--stage_sizes", "1,1,1", "--batch_size", "16", "--steps_per_call", "4", "--epochs", "1"]
    sweep = str(tmp_path / "sweep")
    train(
        "--workdir",
        sweep,
        "--data_dir",
        archive,
        *flags,
        "--sweep",
        "num_filters=4,16",
        "--seeds",
        "1",
        env=ENV,
    )
    single = str(tmp_path / "single")
    chosen = dict(ENV, JAX_NUM_CPU_DEVICES="1")
    train("--workdir", single, "--data_dir", archive, *flags, "--num_filters", "4", "--seed", "1", env=chosen)
    notebook = tmp_path / "notebook"
    proc = subprocess.run(
        [sys.executable, "-c", TWO_MODELS, archive, str(notebook)], env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    split = min(tuning.cores(), 2)  # the 16-filter model is worth a device per core; 16 images split in 2
    have, want = json.loads(proc.stdout.splitlines()[-1])
    assert have == want == split  # train.py's split, without configure
    small, large = (os.path.join(sweep, f"num_filters={n}", "seed_1") for n in (4, 16))
    assert_same_run(small, single)
    assert_same_run(str(notebook / "b"), single)
    assert_same_run(large, str(notebook / "a"))
    for workdir, count in (
        (small, 1),
        (single, 1),
        (notebook / "b", 1),
        (large, split),
        (notebook / "a", split),
    ):
        devices = read(workdir, "run.json")["devices"]
        assert devices["count"] == count and devices["platform"] == "cpu", (workdir, devices)
    assert read(single, "run.json")["devices"]["of"] == 1  # the user's count wins


@pytest.mark.slow
def test_a_finished_sweep_grows_as_a_run_does(swept, archive, tmp_path):
    """--epochs 3 on a sweep of 2 epochs: accepted as a run accepts it on resume; every run trains
    its third epoch and records the change, runs.json and the summary follow."""
    _, reference, _ = swept
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    grown = [a if a != "2" else "3" for a in SWEEP]  # --epochs 3
    out = train("--workdir", workdir, "--data_dir", archive, *TINY, *grown).stdout
    assert out.count("Epoch 3/3") == 4 and "Epoch 2/3" not in out
    for setting in SETTINGS:
        for seed in (0, 1):
            run = os.path.join(workdir, setting, f"seed_{seed}")
            assert [m["epoch"] for m in metrics(run)] == [1, 2, 3]
            change = read(run, "run.json")["changes"][-1]
            assert change["settings"] == {"epochs": [2, 3]} and change["epoch"] == 2, change
    sweep = read(workdir, "runs.json")
    assert sweep["config"]["epochs"] == 3 and sweep["changes"] == [{"settings": {"epochs": [2, 3]}}]
    summary = read(workdir)
    assert summary["complete"] and all(r["epochs"] == 3 for e in summary["settings"] for r in e["runs"])
    again = train("--workdir", workdir, "--data_dir", archive, *TINY, *grown).stdout
    assert again.count("is finished") == 4 and "Epoch" not in again.replace("epoch", "")
