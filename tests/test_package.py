"""What a user installs: the sdist and the wheel hold every module of resnet_jax/ and nothing of
tests/, benchmarks/ or experiments/; the installed wheel, run from outside the repository, has
its `resnet-jax` command, `python -m resnet_jax`, a version, and trains."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
from cifar_files import write_cifar
from conftest import ENV, ROOT

import resnet_jax as rj

pytestmark = pytest.mark.slow  # end-to-end: the whole file

ANYWHERE = shutil.ignore_patterns(".git", ".venv", ".ci", "__pycache__", "*.egg-info", "build", "dist")
AT_THE_TOP = {"ckpt", "runs", "data"}  # a clone's work folders (resnet_jax/data and runs are the package's)


def SKIP(folder, names):
    skipped = ANYWHERE(folder, names)
    if os.path.abspath(folder) == os.path.abspath(ROOT):
        skipped |= AT_THE_TOP & set(names)
    return skipped


def run(cmd, cwd, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def modules_of_the_tree():
    return sorted(
        os.path.relpath(p, ROOT).replace(os.sep, "/")
        for p in glob.glob(os.path.join(ROOT, "resnet_jax", "**", "*.py"), recursive=True)
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist, built from a copy of the tree (a build never writes into the checkout), and
    the wheel built from that sdist, as pip does."""
    tmp = tmp_path_factory.mktemp("package")
    shutil.copytree(ROOT, tmp / "src", ignore=SKIP)
    build = "from setuptools import build_meta as b; import sys; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    sdist = run([sys.executable, "-c", build, "build_sdist", str(tmp / "dist")], tmp / "src").stdout.split()[
        -1
    ]
    with tarfile.open(tmp / "dist" / sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
        names = [m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name]
    (top,) = os.listdir(tmp / "unpacked")
    wheel = run([sys.executable, "-c", build, "build_wheel", str(tmp / "dist")], tmp / "unpacked" / top)
    return tmp, names, str(tmp / "dist" / wheel.stdout.split()[-1])


def test_the_sdist_and_the_wheel_hold_every_module_and_nothing_else(built):
    _, sdist, wheel = built
    with zipfile.ZipFile(wheel) as z:
        files = z.namelist()
    for listing in (sdist, files):
        missing = sorted(set(modules_of_the_tree()) - set(listing))
        assert not missing, f"not packaged: {missing}"
        assert not [n for n in listing if n.startswith(("tests/", "benchmarks/", "experiments/"))]
    assert "resnet_jax/checkpoint/manager.py" in files  # the subpackage the first wheel missed
    entry_points = next(n for n in files if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "resnet-jax = resnet_jax.cli:main" in z.read(entry_points).decode()


def test_the_installed_wheel_runs_from_outside_the_repository(built):
    tmp, _, wheel = built
    env_dir = tmp / "env"
    # A fresh environment holding only the wheel (no dependencies), which reuses this test
    # environment's packages through a path entry (its .pth files, such as the checkout's
    # editable install, are not processed there).
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], tmp)
    python = str(env_dir / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout
    with open(os.path.join(site.strip(), "_test_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "uv", "pip", "install", "--python", python, "--no-deps", "-q", wheel], tmp)
    outside = tmp / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}

    where = run([python, "-c", "import resnet_jax as rj; print(rj.__file__, rj.__version__)"], outside, env)
    path, version = where.stdout.split()
    assert path.startswith(str(env_dir)) and not path.startswith(ROOT), path  # the wheel, not the checkout
    assert version == rj.__version__ != "0+unknown"

    command = str(env_dir / "bin" / "resnet-jax")
    assert run([command, "--version"], outside, env).stdout.strip() == f"resnet_jax {version}"
    helped = run([command, "--help"], outside, env).stdout
    assert helped.startswith("usage: resnet-jax") and "--epochs" in helped and "--seeds" in helped
    module = run([python, "-m", "resnet_jax", "--help"], outside, env).stdout
    assert module.startswith("usage: python -m resnet_jax")
    bad = subprocess.run([command, "--epochs", "0"], cwd=outside, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: epochs must be a positive integer")

    archive, _ = write_cifar(outside, rows=(8, 8, 8, 8, 8), test_rows=8)
    args = ["--workdir", "w", "--preset", "tiny", "--epochs", "1", "--batch_size", "8", "--data_dir", archive]
    out = run([command, *args], outside, env).stdout
    assert "Test accuracy:" in out and os.path.exists(outside / "w" / "run.json")
