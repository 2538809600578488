"""On a GPU (`pytest -m gpu`, run by benchmarks/gpu.sh; skipped where JAX has no GPU): the scan
device loop equals the python loop, a SIGKILLed run resumes to the uninterrupted result, bfloat16
learns, and a checkpoint written on the GPU restores on the CPU."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import assert_same_run, kill_after_first_epoch, metrics, random_dataset, start, train
from digits import DIGITS, digits_dataset

import resnet_jax as rj
from resnet_jax.device import batches, parallel, programs
from resnet_jax.device import data as device_data

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num_filters", "8", "--stage_sizes", "1,1,1", "--batch_size", "16", "--steps_per_call", "4"]
GPU_ENV = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}


@pytest.fixture(scope="module")
def gpu_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return rj.data.cifar_archive.write_archive(str(root), random_dataset(n_train=200, n_test=64))


def test_scan_loop_equals_python_loop_on_the_gpu(tiny_config):
    ds = random_dataset(n_train=40)
    mesh = parallel.make_mesh()
    data = device_data.to_device(ds, rj.data.dataset.pixel_mean(ds.train_images), tiny_config, mesh)
    key = batches.epoch_key(jax.random.key(1), 0)
    perm = batches.permutation(key, 40)
    out = {}
    with jax.default_matmul_precision("float32"):  # no TF32: compare the loops, not roundings
        for loop in ("scan", "python"):
            state = rj.create_train_state(tiny_config, jax.random.key(0), (32, 32, 3), 5)
            state = parallel.replicate(jax.device_get(state), mesh)
            out[loop] = jax.device_get(
                programs.TrainCall(mesh, loop)(state, data, perm, 0, 0, key, length=4, batch=8)
            )
    (s1, m1), (s2, m2) = out["scan"], out["python"]
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        (s1.params, s1.batch_stats),
        (s2.params, s2.batch_stats),
    )


def test_sigkilled_run_resumes_to_the_uninterrupted_result_on_the_gpu(gpu_archive, tmp_path):
    reference = str(tmp_path / "reference")
    train("--workdir", reference, "--data_dir", gpu_archive, "--epochs", "3", *SMALL, env=GPU_ENV)
    workdir = str(tmp_path / "killed")
    kill_after_first_epoch(start(workdir, gpu_archive, "--epochs", "3", env=GPU_ENV, tiny=SMALL), workdir)
    assert 1 <= len(metrics(workdir)) < 3, "the kill came too late to test anything"
    out = train("--workdir", workdir, "--data_dir", gpu_archive, "--epochs", "3", *SMALL, env=GPU_ENV)
    assert "Resuming" in out.stdout
    assert_same_run(workdir, reference)


def test_bfloat16_learns_digits_on_the_gpu(tmp_path):
    config = dataclasses.replace(DIGITS, epochs=12, lr_epochs=(9,), dtype="bfloat16")
    state, history = rj.train_and_evaluate(config, str(tmp_path / "w"), digits_dataset(), verbosity=0)
    assert history[-1]["val_acc"] >= 0.9, history
    assert jax.tree.leaves(state.params)[0].dtype == np.float32


def test_a_gpu_checkpoint_restores_on_the_cpu(tmp_path):
    workdir = str(tmp_path / "w")
    config = rj.presets.tiny(batch_size=8, eval_batch_size=16, epochs=1)
    state, _ = rj.train_and_evaluate(config, workdir, random_dataset(), verbosity=0)
    assert jax.tree.leaves(state.params)[0].devices().pop().platform == jax.default_backend()
    out = str(tmp_path / "cpu.npz")
    code = (
        "import sys, numpy as np, jax, resnet_jax as rj\n"
        f"s = rj.restore({workdir!r}, 'latest')\n"
        "assert jax.tree.leaves(s.params)[0].devices().pop().platform == 'cpu'\n"
        "leaves = jax.tree.leaves((s.params, s.batch_stats, s.opt_state))\n"
        f"np.savez({out!r}, *[np.asarray(x) for x in leaves])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(GPU_ENV, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    on_cpu = np.load(out)
    on_gpu = jax.tree.leaves(jax.device_get((state.params, state.batch_stats, state.opt_state)))
    assert len(on_cpu.files) == len(on_gpu)
    for i, leaf in enumerate(on_gpu):
        np.testing.assert_array_equal(on_cpu[f"arr_{i}"], leaf)
