"""Data parallelism: 4 fake CPU devices and 2 processes (jax.distributed over loopback) train like
1 device; the batch is really split; bfloat16 keeps float32 variables."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax.device import parallel

pytestmark = pytest.mark.slow  # end-to-end: the whole file

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(out, workdir, devices=1, dtype="float32", distributed=None):
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(
            [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"]
        ),
        PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [sys.executable, os.path.join(HERE, "parallel_worker.py"), str(out), str(workdir), dtype]
    if distributed:
        return [
            subprocess.Popen(
                cmd + list(map(str, d)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for d in distributed
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def load(out):
    with open(str(out) + ".json") as f:
        report = json.load(f)
    return report, dict(np.load(str(out)))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    worker(d / "out.npz", d / "w", devices=1)
    return load(d / "out.npz")


def assert_same_training(a, b, rtol=2e-4, atol=5e-5):
    """Metrics to 1e-4; parameters to 5e-5 absolute: 1/20 of one Adam step (lr 1e-3), since
    Adam turns float-rounding differences of near-zero gradients into visible steps."""
    (ra, pa), (rb, pb) = a, b
    for ha, hb in zip(ra["history"], rb["history"]):
        for k in ("loss", "acc", "val_loss", "val_acc"):
            assert ha[k] == pytest.approx(hb[k], rel=1e-4, abs=1e-6), (k, ha, hb)
    assert pa.keys() == pb.keys()
    for k in pa:  # every leaf: conv biases before a BatchNorm are folded into it (exact zeros)
        np.testing.assert_allclose(pa[k], pb[k], rtol=rtol, atol=atol, err_msg=k)


def test_four_devices_train_like_one(one_device, tmp_path):
    worker(tmp_path / "out.npz", tmp_path / "w", devices=4)
    four = load(tmp_path / "out.npz")
    assert four[0]["devices"] == 4 and one_device[0]["devices"] == 1
    assert four[0]["per_device_batch_in_hlo"] == [2]  # 8 images split 4 ways
    assert one_device[0]["per_device_batch_in_hlo"] == [8]
    assert_same_training(four, one_device)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_and_their_checkpoint_restores(one_device, tmp_path):
    """Two processes of one multi-host run train seeds 0 and 1 of a multi-run (rj.train_many);
    seed 0 is the single run. Everything the runs and the multi-run write and print goes through
    process 0 (resnet_jax.writer): process 1 writes no file of the workdir but its checkpoint
    parts, and prints nothing; process 0 writes each file once and prints each line once."""
    address = f"127.0.0.1:{free_port()}"
    procs = worker(
        tmp_path / "out.npz",
        tmp_path / "w",
        devices=1,
        distributed=[(address, 2, 0, "seeds"), (address, 2, 1, "seeds")],
    )
    printed = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        printed.append(out)
    two = load(tmp_path / "out.npz")
    assert two[0]["processes"] == 2 and two[0]["devices"] == 2
    assert_same_training(two, one_device)
    # only process 0 wrote the metrics, once per epoch
    with open(tmp_path / "w" / "seed_0" / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    state = rj.restore(str(tmp_path / "w" / "seed_0"), "latest")  # a single process reads their checkpoint
    np.testing.assert_array_equal(
        np.asarray(state.params["head"]["kernel"]), two[1]["['params']['head']['kernel']"]
    )
    writes = [json.load(open(tmp_path / f"out.npz.writes.{i}.json")) for i in (0, 1)]
    gloo = lambda text: [line for line in text.splitlines() if not line.startswith("[Gloo]")]  # gloo's own
    assert writes[1] == [] and gloo(printed[1]) == []  # process 1: no file, no line
    renamed = [path for how, path in writes[0] if how == "rename"]
    for name in ("runs.json", "summary.json", "curves.png"):  # the multi-run's files, once each
        assert renamed.count(name) == 1, (name, renamed)
    for seed in (0, 1):  # each run's record: at its start and once finished
        assert renamed.count(f"seed_{seed}/run.json") == 2, renamed
    lines = [line for line in gloo(printed[0]) if line.strip()]
    assert sum(line.startswith("Seeds of one recipe") for line in lines) == 1
    assert sum(line.startswith("Test accuracy over 2 seeds") for line in lines) == 1
    assert len([line for line in lines if line.startswith("Epoch 1/2")]) == 2  # one per run


def test_bfloat16_trains_with_float32_variables(tmp_path):
    worker(tmp_path / "out.npz", tmp_path / "w", dtype="bfloat16")
    report, params = load(tmp_path / "out.npz")
    assert {v.dtype for v in params.values()} == {np.dtype(np.float32)}
    state = rj.restore(str(tmp_path / "w"), "latest")
    import jax

    assert {
        x.dtype
        for x in jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
        if hasattr(x, "dtype") and x.ndim > 0
    } == {np.dtype(np.float32)}
    assert np.isfinite(report["history"][-1]["loss"])


def test_batch_size_must_divide_over_devices():
    import jax

    mesh = parallel.make_mesh(jax.devices() * 1)
    parallel.check_batch_size(8, mesh)
    fake = type("M", (), {"size": 3})()
    with pytest.raises(rj.UserError, match="cannot be split over 3 devices; use a multiple of 3"):
        parallel.check_batch_size(32, fake)


def test_unreachable_coordinator_and_bad_process_id_fail_fast():
    from resnet_jax.device import distributed

    with pytest.raises(rj.UserError, match="out of range for 2 processes"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(HERE), "train.py"),
            "--coordinator_address",
            f"127.0.0.1:{free_port()}",
            "--num_processes",
            "2",
            "--process_id",
            "1",
            "--init_timeout",
            "5",
            "--workdir",
            "/tmp/unused",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot reach the coordinator" in proc.stderr
