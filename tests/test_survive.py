"""Surviving preemption and mistakes: SIGTERM mid-epoch, NaN guard, one run per workdir, corrupt
checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
    ENV,
    ROOT,
    TINY,
    Lines,
    assert_same_run,
    metrics,
    start,
    train,
    train_on,
    wait_for,
    without_seconds,
)

import resnet_jax as rj
from resnet_jax.data import tfds_data


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resumes_exactly(full_run, archive, tmp_path):
    _, reference = full_run
    workdir = str(tmp_path / "w")
    # steps_per_call 1: a device call per step, so the stop lands mid-epoch
    proc = start(workdir, archive, "--epochs", "3", "--steps_per_call", "1")
    assert wait_for(
        lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(metrics(workdir)) >= 1
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Run the same command to resume" in err
    assert err.startswith("SIGTERM: saving the latest state"), err  # no blank line first
    resumed = train(
        "--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY, "--steps_per_call", "1"
    ).stdout
    assert "Resuming" in resumed
    assert without_seconds(metrics(workdir)) == without_seconds(metrics(reference))
    a, b = rj.restore(workdir, "latest"), rj.restore(reference, "latest")
    jax.tree.map(np.testing.assert_array_equal, (a.params, a.batch_stats), (b.params, b.batch_stats))


@pytest.mark.parametrize("save_thread", [True, False])
def test_a_save_keeps_its_arrays_when_the_next_step_donates_them(tmp_path, save_thread):
    # Checkpoints.save returns while orbax still writes (on a worker thread, in the background):
    # the arrays it was given may be donated by the next train call at once. Deleting them right
    # after save stands in for that; the checkpoint must still hold their values.
    from resnet_jax import checkpoint
    from resnet_jax.checkpoint import Progress

    state = rj.create_train_state(rj.presets.tiny(), jax.random.key(0), (32, 32, 3), 5)
    state = state.replace(step=jax.numpy.asarray(7, jax.numpy.int32))
    expected = jax.device_get(state)
    with checkpoint.Checkpoints(str(tmp_path), save_thread=save_thread) as ckpts:
        ckpts.save(state, Progress().to_meta(), rank=1)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpts.wait()
        assert ckpts.steps() == [7]
    with checkpoint.Checkpoints(str(tmp_path), read_only=True) as ckpts:
        restored, _, step = ckpts.restore(expected, "latest")
    assert step == 7
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_checkpoints(archive, tmp_path):
    workdir = str(tmp_path / "w")
    # epoch 1 is sane; from epoch 2 the rate is absurd
    proc = train_on(
        workdir, archive, *"--epochs 3 --lr_epochs 1 --lr_factors 1e35".split(), *TINY, check=False
    )
    assert proc.returncode == 2
    assert "at epoch 2, step" in proc.stderr and "last good checkpoint" in proc.stderr
    assert len(metrics(workdir)) == 1
    state = rj.restore(workdir, "best")
    assert int(state.step) == 6
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_one_run_per_workdir_and_no_stuck_lock(archive, tmp_path):
    workdir = str(tmp_path / "w")
    first = start(workdir, archive, "--epochs", "50")
    lock = os.path.join(workdir, ".lock")
    assert wait_for(lambda: os.path.exists(lock) and open(lock).read().strip() == str(first.pid))
    second = train("--workdir", workdir, "--data_dir", archive, "--epochs", "50", *TINY, check=False)
    assert second.returncode == 2 and f"in use by a running training (pid {first.pid})" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = train("--workdir", workdir, "--data_dir", archive, "--epochs", "1", *TINY, check=False)
    assert third.returncode == 0, third.stderr


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_and_keeps_best(full_run, archive, tmp_path):
    import shutil

    _, reference = full_run
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckdir) if s.isdigit())
    latest = os.path.join(ckdir, str(steps[-1]), "state")
    for root, _, files in os.walk(latest):
        for f in files:
            open(os.path.join(root, f), "wb").close()  # emptied: unreadable
    out = train("--workdir", workdir, "--data_dir", archive, "--eval_only", "--which", "latest")
    # the fall-back is said once, in one line, on stderr (warnings are not output)
    warnings = [line for line in out.stderr.splitlines() if "unreadable checkpoint" in line]
    assert len(warnings) == 1 and "unreadable" not in out.stdout
    assert sorted(int(s) for s in os.listdir(ckdir) if s.isdigit()) == steps  # nothing deleted
    rj.restore(workdir, "best")  # still readable


# Where a SIGKILL lands, and how the test waits for that moment (the run is 12 tiny epochs).
PHASES = {
    "starting": lambda out, workdir, metrics_seen: time.sleep(0.3) or True,  # before JAX is up
    "compiling": lambda out, workdir, metrics_seen: wait_for(lambda: out.seen("Compiling the train step")),
    "mid-epoch": lambda out, workdir, metrics_seen: wait_for(lambda: out.seen("Epoch ")),
    "saving": lambda out, workdir, metrics_seen: wait_for(
        lambda: any("tmp" in n for n in listing(os.path.join(workdir, "checkpoints"))), seconds=60
    ),
    "after a save": lambda out, workdir, metrics_seen: wait_for(
        lambda: metrics_seen < len(listing(workdir, "metrics.jsonl")), seconds=60
    ),
}


@pytest.mark.slow
def test_sigkill_at_each_phase_never_loses_the_run(archive, tmp_path):
    """A SIGKILL while starting, compiling, mid-epoch, inside a checkpoint save and right after
    one, a restart after each; the finished run equals an uninterrupted one bit for bit
    (metrics, latest params, statistics and Adam state, best params) and the best checkpoint
    always reads."""
    epochs = "12"
    reference = str(tmp_path / "ref")
    train("--workdir", reference, "--data_dir", archive, "--epochs", epochs, *TINY)
    workdir = str(tmp_path / "w")
    killed = []
    for phase in ("after a save", "starting", "compiling", "mid-epoch", "saving", "saving"):
        before = len(metrics(workdir)) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else 0
        proc = start(workdir, archive, "--epochs", epochs)
        out = Lines(proc)
        hit = PHASES[phase](out, workdir, before)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append(phase if hit else f"{phase} (missed)")
        proc.wait()
        out.thread.join()
        if phase == "after a save":
            assert 1 <= len(metrics(workdir)) < 12, "the kill came too late to test anything"
        if os.path.isdir(os.path.join(workdir, "checkpoints")) and steps_of(workdir):
            state = rj.restore(workdir, "best")  # always readable
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
        if phase == "saving" and "saving" in killed:
            break  # one kill inside a save is what the second try is for
    print("killed:", killed)
    assert {"after a save", "starting", "compiling", "mid-epoch", "saving"} <= set(killed), killed
    out = train("--workdir", workdir, "--data_dir", archive, "--epochs", epochs, *TINY).stdout
    assert "Resuming" in out
    a = assert_same_run(workdir, reference)  # metrics, and latest params, statistics, Adam state
    assert int(a.step) == 12 * 6
    b = rj.restore(reference, "best")
    jax.tree.map(np.testing.assert_array_equal, rj.restore(workdir, "best").params, b.params)


def steps_of(workdir):
    return [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]


def listing(folder, metrics_file=None):
    """The names in a folder (none while it does not exist), or the lines of its metrics file."""
    if metrics_file is not None:
        return metrics(folder) if os.path.exists(os.path.join(folder, metrics_file)) else []
    return os.listdir(folder) if os.path.isdir(folder) else []


def _archive_with(tmp_path, mutate):
    """A small extracted cifar10 folder whose first batch is rewritten by `mutate(dict)`."""
    import pickle

    from cifar_files import write_cifar

    folder, _ = write_cifar(tmp_path / "data", rows=(20,), test_rows=10, tar=False)
    path = os.path.join(folder, "data_batch_1")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    with open(path, "wb") as f:
        f.write(pickle.dumps(mutate(batch), protocol=2))
    return folder


def _bad_data(kind, tmp_path):
    from cifar_files import write_cifar

    if kind == "missing":
        return str(tmp_path / "nowhere"), "does not exist"
    if kind == "empty":
        p = tmp_path / "cifar-10-python.tar.gz"
        p.write_bytes(b"")
        return str(p), "truncated or not a CIFAR tar.gz"
    if kind == "truncated":
        path, _ = write_cifar(tmp_path)
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:2000])
        return path, "truncated or not a CIFAR tar.gz"
    if kind == "foreign":
        import tarfile

        p = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(p, "w:gz") as t:
            t.add(__file__, arcname="something/else.py")
        return str(p), "not a complete cifar10 archive"
    if kind == "wrong pickle":
        return _archive_with(tmp_path, lambda b: {b"pixels": b[b"data"]}), "lacks the 'data' and 'labels'"
    if kind == "labels out of range":
        return _archive_with(tmp_path, lambda b: {**b, b"labels": [12] * 20}), r"labels must be in [0, 10)"
    if kind == "mismatched lengths":
        return _archive_with(tmp_path, lambda b: {**b, b"labels": [1] * 7}), "7 labels for 20 images"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    ["missing", "empty", "truncated", "foreign", "wrong pickle", "labels out of range", "mismatched lengths"],
)
def test_bad_data_through_the_command_line(kind, tmp_path):
    data_dir, message = _bad_data(kind, tmp_path)
    workdir = tmp_path / "w"
    proc = train("--workdir", str(workdir), "--data_dir", data_dir, *TINY, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (workdir / "checkpoints").exists()


@pytest.mark.slow
def test_offline_tfds_through_the_command_line(tmp_path):
    """train.py's main with the network cut (socket patched in the child, no traffic sent): one
    line, and no wait on the network: each download host tried once (a host that does not refuse
    at once costs its 5 s timeout), no retries, nothing slept. Counted, not timed (a loaded
    machine stretches any time)."""
    code = (
        "import json, socket, sys, time\n"
        "tried, slept = [], []\n"
        "def cut(address, *a, **k):\n"
        "    tried.append(list(address))\n"
        "    raise OSError('network is unreachable')\n"
        "socket.create_connection = cut\n"
        "socket.socket.connect = socket.socket.connect_ex = lambda self, address: cut(address)\n"
        "time.sleep = lambda seconds: slept.append(seconds)\n"
        "from resnet_jax.cli import main\n"
        f"code = main(['--workdir', {str(tmp_path / 'w')!r}, '--data_dir', {str(tmp_path)!r}])\n"
        "print(json.dumps({'tried': tried, 'slept': slept}))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "cifar-10-python.tar.gz" in lines[0] and "TFDS_DATA_DIR" in lines[0], (
        proc.stderr
    )
    network = json.loads(proc.stdout.splitlines()[-1])
    hosts = [list(address) for address in tfds_data.DOWNLOAD_HOSTS]
    assert network["tried"] and all(network["tried"].count(h) <= 1 for h in hosts), network
    assert all(address in hosts for address in network["tried"]) and sum(network["slept"]) < 1, network
