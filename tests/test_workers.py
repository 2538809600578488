"""Workers: a sweep's runs trained by several processes at once (resnet_jax.runs.workers), each
run bit for bit the run trained alone; one console, one summary; a stop saves every worker's
run, a killed worker ends in one line naming its run, and the same command then finishes."""

import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import ENV, ROOT, TINY, assert_same_run, random_dataset, run_json, train, wait_for
from conftest import metrics as epochs_of
from own_parts import CNN

import resnet_jax as rj
from resnet_jax import process, tuning
from resnet_jax.runs import workers

SWEEP = ["--sweep", "learning_rate=0.001,0.003", "--seeds", "0", "--epochs", "2"]
FOLDERS = [os.path.join("learning_rate=0.001", "seed_0"), os.path.join("learning_rate=0.003", "seed_0")]


def test_how_many_workers_the_machine_can_feed():
    cpu = tuning.decide("cpu")
    tiny, seed = rj.presets.tiny(), rj.Config()
    assert workers.decide(cpu, [tiny], (32, 32, 3), cores=2) == 2  # one device a run: a core each
    assert workers.decide(cpu, [tiny], (32, 32, 3), cores=8) == 8
    assert workers.decide(cpu, [seed], (32, 32, 3), cores=2) == 1  # it uses every core already
    assert workers.decide(cpu, [tiny, seed], (32, 32, 3), cores=2) == 1  # the largest run decides
    assert workers.decide(tuning.decide("gpu"), [tiny], (32, 32, 3), cores=16) == 1
    assert workers.decide(cpu, [tiny], (32, 32, 3), model=CNN(), cores=2) == 1  # your own model
    mine, half = sorted(os.sched_getaffinity(0)), len(os.sched_getaffinity(0)) // 2
    expected = [tuple(mine[:half]), tuple(mine[half : 2 * half])] if half else [(), ()]
    assert workers._shares(2) == expected  # contiguous shares of this process's cores
    kwargs = {"model": CNN()}
    with pytest.raises(
        rj.UserError, match="your own model cannot be sent to worker processes; pass workers=1"
    ):
        workers.count(2, cpu, [tiny], (32, 32, 3), kwargs, runs=4)
    with pytest.raises(rj.UserError, match="workers must be 'auto' or a positive integer"):
        workers.count("many", cpu, [tiny], (32, 32, 3), {}, runs=4)
    assert workers.count(5, cpu, [tiny], (32, 32, 3), {}, runs=2) == 2  # never more than the runs


def test_a_pinned_worker_compiles_with_the_whole_machine_and_is_pinned_again_after(monkeypatch):
    """XLA:CPU splits a program by the cores its threads may use when it compiles: while any
    compile runs (they may overlap), every thread of a pinned worker has the whole machine, those
    started meanwhile included; after the last, its share again."""
    machine = os.sched_getaffinity(0)
    share = {min(machine)}
    monkeypatch.setitem(process._PROCESS, "machine", machine)
    monkeypatch.setitem(process._PROCESS, "pinned", sorted(share))
    release = threading.Event()
    waiting = threading.Thread(target=release.wait)
    waiting.start()
    affinity = lambda thread: os.sched_getaffinity(thread.native_id)
    try:
        process._pin_threads(share)
        first, second = process.compiling_as_alone(), process.compiling_as_alone()
        first.__enter__()
        assert affinity(waiting) == os.sched_getaffinity(0) == machine
        second.__enter__()
        started = threading.Thread(target=release.wait)
        started.start()
        first.__exit__(None, None, None)  # the other compile still runs
        assert affinity(waiting) == affinity(started) == machine
        second.__exit__(None, None, None)
        assert affinity(waiting) == affinity(started) == os.sched_getaffinity(0) == share
        monkeypatch.delitem(process._PROCESS, "machine")  # not a pinned worker: nothing changes
        with process.compiling_as_alone():
            assert os.sched_getaffinity(0) == share
        assert os.sched_getaffinity(0) == share
    finally:
        release.set()
        process._pin_threads(machine)


@pytest.mark.slow
def test_workers_train_each_run_as_it_trains_alone_with_one_console(archive, tmp_path):
    alone, together = str(tmp_path / "alone"), str(tmp_path / "together")
    train("--workdir", alone, "--data_dir", archive, *TINY, *SWEEP, "--workers", "1")
    # a compilation cache of their own: the workers compile every program themselves, pinned
    own_cache = dict(ENV, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = train(
        "--workdir", together, "--data_dir", archive, *TINY, *SWEEP, "--workers", "2", env=own_cache
    ).stdout
    assert "2 at once (workers" in out.splitlines()[0], out
    for folder in FOLDERS:
        assert_same_run(os.path.join(together, folder), os.path.join(alone, folder))
        assert run_json(os.path.join(together, folder))["devices"]["count"] == 1
    results = [line for line in out.splitlines() if line.startswith("[worker") and ": test accuracy " in line]
    assert len(results) == 2 and out.count("\nsetting ") == 1  # one console: each run's result, one table
    assert not os.path.exists(os.path.join(together, ".workers")) and os.path.exists(
        os.path.join(together, "summary.json")
    )


@pytest.mark.slow
def test_the_notebook_sweep_with_workers_equals_one_after_another(tmp_path):
    ds = random_dataset(n_train=48, n_test=16, shape=(16, 16, 3))
    config = rj.presets.tiny(batch_size=8, epochs=1)
    grid = {"learning_rate": [1e-3, 3e-3]}
    one = rj.sweep(config, str(tmp_path / "one"), grid, dataset=ds, workers=1, verbosity=0)
    two = rj.sweep(config, str(tmp_path / "two"), grid, dataset=ds, workers=2, verbosity=0)
    assert [e["runs"][0]["test_accuracy"] for e in one["settings"]] == [
        e["runs"][0]["test_accuracy"] for e in two["settings"]
    ]
    for folder in ("learning_rate=0.001/seed_0", "learning_rate=0.003/seed_0"):
        assert_same_run(str(tmp_path / "two" / folder), str(tmp_path / "one" / folder))
    results = rj.train_many(config, str(tmp_path / "many"), seeds=[1, 2], dataset=ds, workers=2, verbosity=0)
    assert [len(history) for _, history in results] == [1, 1] and results[0][0].config.seed == 1


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


@pytest.mark.slow
def test_a_stop_saves_every_workers_run_and_a_killed_worker_is_one_line(archive, tmp_path):
    workdir = str(tmp_path / "w")
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", workdir, "--data_dir", archive]
    command += [*TINY, *SWEEP[:-1], "30", "--workers", "2"]  # 30 epochs: stopped long before
    metrics = [os.path.join(workdir, f, "metrics.jsonl") for f in FOLDERS]
    # SIGTERM to the parent: each worker saves, the parent says so in one line, exit 130
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: all(os.path.exists(m) for m in metrics), 300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("SIGTERM")]
    assert proc.returncode == 130 and len(lines) == 1 and "Run the same command to resume" in lines[0], err
    assert all(run_json(os.path.join(workdir, f))["test"] is None for f in FOLDERS)
    # a worker killed: the parent stops the other, names the run, exit 3; nothing is lost
    epochs = {f: len(epochs_of(os.path.join(workdir, f))) for f in FOLDERS}
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: len(children(proc.pid)) == 2, 120)
    # the workers are training (resumed): an epoch more in a run (not a fixed sleep)
    assert wait_for(lambda: any(len(epochs_of(os.path.join(workdir, f))) > epochs[f] for f in FOLDERS), 120)
    os.kill(children(proc.pid)[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 3 and len(lines) == 1, err
    assert "stopped (killed by SIGKILL) while training learning_rate=" in lines[0] and "resume" in lines[0], (
        err
    )
    for f in FOLDERS:  # every run still resumes from its checkpoints
        assert rj.restore(os.path.join(workdir, f), "latest").config.epochs == 30
