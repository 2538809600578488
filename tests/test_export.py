"""Export for serving (rj.export, train.py --export): each format reloads in a fresh process that
imports neither resnet_jax, flax nor optax, and gives rj.predict's probabilities at batch sizes 1,
7 and 64, for the seed recipe's model and for your own (without BatchNorm); every bad input is
one line and overwrites nothing."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ENV, TINY, folder_hash, stderr_lines, train
from own_parts import CNN

import resnet_jax as rj

pytestmark = pytest.mark.slow

LOAD_JAX = """
import sys, numpy as np, jax
exported = jax.export.deserialize(open(sys.argv[1] + "/model.jax", "rb").read())
images = np.load(sys.argv[2])
out = {f"b{n}": np.asarray(exported.call(images[:n])) for n in (1, 7, 64)}
np.savez(sys.argv[3], **out)
print(sorted(m for m in ("resnet_jax", "flax", "optax") if m in sys.modules))
"""

LOAD_SAVED_MODEL = """
import sys, numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
images = np.load(sys.argv[2])
out = {f"b{n}": serve(images=tf.constant(images[:n]))["probabilities"].numpy() for n in (1, 7, 64)}
np.savez(sys.argv[3], **out)
print(sorted(m for m in ("resnet_jax", "flax", "optax") if m in sys.modules))
"""


@pytest.fixture(scope="module")
def trained(archive, tmp_path_factory):
    """A workdir of the tiny recipe (with BatchNorm), one epoch; 64 test images."""
    root = tmp_path_factory.mktemp("export")
    workdir = str(root / "w")
    train("--workdir", workdir, "--data_dir", archive, "--epochs", "1", *TINY)
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    np.save(root / "images.npy", images)
    return root, workdir, images


def reload(tmp_path, code, folder, images_file):
    out = tmp_path / "out.npz"
    env = {k: v for k, v in ENV.items() if k != "XLA_FLAGS"}  # a consumer's plain process
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(images_file), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return np.load(out), json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))


@pytest.mark.parametrize("format, code", [("jax", LOAD_JAX), ("saved_model", LOAD_SAVED_MODEL)])
def test_each_format_reloads_without_resnet_jax_and_predicts_as_predict(trained, tmp_path, format, code):
    root, workdir, images = trained
    folder = tmp_path / "served"
    record = rj.export(workdir, str(folder), format=format)
    out, imported = reload(tmp_path, code, folder, root / "images.npy")
    assert imported == []  # neither resnet_jax, flax nor optax
    state = rj.restore(workdir)
    for n in (1, 7, 64):
        np.testing.assert_allclose(out[f"b{n}"], rj.predict(state, images[:n]), atol=1e-5, rtol=0)
    saved = json.load(open(folder / "model.json"))
    assert saved == record and saved["format"] == format
    assert saved["input"] == {"shape": [None, 32, 32, 3], "dtype": "uint8", "what": "raw images, NHWC, 0-255"}
    assert saved["output"]["shape"] == [None, 10] and len(saved["class_names"]) == 10
    assert saved["source"]["workdir"] == workdir and saved["source"]["step"] == 6
    assert saved["jax_version"] == jax.__version__ and "6 months" in saved["compatibility"]


def test_your_own_model_without_batch_norm_exports_from_its_state(trained, tmp_path):
    root, _, images = trained
    rng = np.random.default_rng(1)
    ds = rj.Dataset(
        rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, 32),
        images[:16],
        rng.integers(0, 10, 16),
        num_classes=10,
    )
    state, _ = rj.train_and_evaluate(
        rj.presets.tiny(batch_size=8, epochs=1), str(tmp_path / "w"), ds, model=CNN(), verbosity=0
    )
    rj.export(state, str(tmp_path / "served"))
    out, imported = reload(tmp_path, LOAD_JAX, tmp_path / "served", root / "images.npy")
    assert imported == []
    for n in (1, 7, 64):
        np.testing.assert_allclose(out[f"b{n}"], rj.predict(state, images[:n]), atol=1e-5, rtol=0)


def test_the_command_line_exports_in_one_line_and_refuses_what_would_lose_data(trained, tmp_path):
    _, workdir, _ = trained
    target = tmp_path / "served"
    proc = train("--workdir", workdir, "--export", str(target))
    lines = proc.stdout.strip().splitlines()
    assert (
        lines[-1].startswith(f"Exported the best checkpoint of {workdir}")
        and f"to {target}: model.jax" in lines[-1]
    )
    assert sorted(os.listdir(target)) == ["model.jax", "model.json"]
    first = json.load(open(target / "model.json"))
    # a new export of the same run replaces the old one, whole, and leaves nothing beside it
    proc = train(
        "--workdir", workdir, "--export", str(target), "--which", "latest", "--export_format", "saved_model"
    )
    assert json.load(open(target / "model.json"))["format"] == "saved_model" != first["format"]
    assert sorted(os.listdir(tmp_path)) == ["served"]
    # bad inputs: one line, exit 2, nothing touched
    afile = tmp_path / "afile"
    afile.write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine too")
    empty = tmp_path / "nothing"
    empty.mkdir()
    for args, words in (
        (["--workdir", workdir, "--export", str(afile)], "is a file; export to a new folder"),
        (["--workdir", workdir, "--export", str(other)], "holds files that are not a resnet_jax export"),
        (["--workdir", str(empty), "--export", str(tmp_path / "x")], "holds no resnet_jax run"),
        (
            ["--workdir", workdir, "--export", str(tmp_path / "x"), "--export_format", "onnx"],
            "invalid choice",
        ),
    ):
        before = folder_hash(tmp_path)
        proc = train(*args, check=False)
        assert proc.returncode == 2 and len(stderr_lines(proc)) == 1 and words in proc.stderr, (
            args,
            proc.stderr,
        )
        assert folder_hash(tmp_path) == before and afile.read_text() == "mine"


@pytest.mark.parametrize("format", ["jax", "saved_model"])
def test_the_readmes_loading_lines_run_without_resnet_jax(trained, tmp_path, format):
    """README, Export for serving: the few lines that load each format and predict."""
    import re

    root, workdir, images = trained
    readme = open(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    ).read()
    code = re.search(rf"<!-- load-{format} -->\s*```python\n(.*?)```", readme, re.S).group(1)
    rj.export(workdir, str(tmp_path / "served"), format=format)
    program = (
        "import sys, numpy as np\nimages = np.load(sys.argv[1])[:7]\n"
        + code
        + "\nnp.save(sys.argv[2], probabilities)\n"
        + "print(sorted(m for m in ('resnet_jax', 'flax', 'optax') if m in sys.modules))\n"
    )
    env = {k: v for k, v in ENV.items() if k != "XLA_FLAGS"}
    out = tmp_path / "p.npy"
    proc = subprocess.run(
        [sys.executable, "-c", program, str(root / "images.npy"), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stderr
    np.testing.assert_allclose(np.load(out), rj.predict(rj.restore(workdir), images[:7]), atol=1e-5, rtol=0)
