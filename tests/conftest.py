import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# resnet_jax's caches (compiled steps, decoded image folders) in one folder for the whole test
# session, its pytest-xdist workers included (they inherit the variable from the process that
# starts them, which removes the folder at the end): the tests share what they compile, and never
# read or write the user's ~/.cache.
CACHE_HOME = os.environ.get("RESNET_JAX_TEST_CACHE") or tempfile.mkdtemp(prefix="resnet_jax-tests-cache-")
OWNS_CACHE = "RESNET_JAX_TEST_CACHE" not in os.environ
os.environ["RESNET_JAX_TEST_CACHE"] = os.environ["XDG_CACHE_HOME"] = CACHE_HOME
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

from resnet_jax import process, tuning  # noqa: E402

# XLA:CPU programs compiled for the tests' speed for the whole test session (the subprocesses
# inherit it): the suite is mostly compiles of small models. LLVM's optimization level 0 halves
# XLA's backend time (a tiny train step: 3.6-4.5 -> 1.6-2.2 s to compile, 12.5 -> 18-22 ms a step
# on an AMD EPYC, Zen 3), and XLA's older elemental emitters instead of its fusion emitters cut a
# tiny run's compile again, 2.3 -> 0.8 s (docs/performance.md). Numbers differ from the defaults'
# by float rounding (3.9e-7 in the parameters after 6 tiny steps); every test compares runs
# compiled alike. On a GPU (benchmarks/gpu.sh runs the gpu tests) XLA's defaults stay.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
if tuning.detect_platform() == "cpu" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), *TEST_XLA_FLAGS)).strip()

# This process as train.py sets itself up, before JAX starts: malloc, the compilation cache, and
# one CPU device (JAX's default; the tests that split the CPU run processes of their own).
process.setup(cpu_devices=1)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from cifar_files import write_cifar  # noqa: E402

import resnet_jax as rj  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_filters", "4", "--stage_sizes", "1,1,1", "--batch_size", "16", "--steps_per_call", "4"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")


def train(*args, check=True, env=None):
    """train.py's `main` with these arguments: in this process (its output captured), or in a
    subprocess when `env` is given (a process of its own: environment, caches, devices)."""
    if env is not None:
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    else:
        proc = run_main([str(a) for a in args])
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_main(argv, main=None):
    """`main(argv)` (train.py's by default) in this process, as a finished process: its exit
    status and what it printed on stdout and stderr."""
    from resnet_jax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = (main or cli.main)(argv)
        except SystemExit as e:  # argparse: --help (0), a usage error (2)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(["train.py", *argv], code, out.getvalue(), err.getvalue())


def train_on(workdir, archive, *extra, check=True, env=None):
    """train.py --workdir `workdir` --data_dir `archive` plus `extra` flags."""
    return train("--workdir", workdir, "--data_dir", archive, *extra, check=check, env=env)


def start(workdir, archive, *extra, env=None, tiny=TINY):
    """train.py started in the background on `archive` (stdout and stderr piped, text)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--workdir",
        workdir,
        "--data_dir",
        archive,
        *tiny,
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


class Lines:
    """A process's stdout, read line by line on a thread (so waiting for a line never blocks)."""

    def __init__(self, proc):
        self.lines = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")))
        self.thread.start()

    def seen(self, prefix):
        return any(line.startswith(prefix) for line in list(self.lines))


class StopSoon:
    """A `stop` for train_and_evaluate that asks at the loop's second look: mid-epoch 1."""

    asked = 0

    def is_set(self):
        self.asked += 1
        return self.asked >= 2


def wait_for(predicate, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def kill_after_first_epoch(proc, workdir):
    """SIGKILL `proc` (no chance to clean up) as soon as metrics.jsonl lists an epoch."""
    path = os.path.join(workdir, "metrics.jsonl")
    wait_for(lambda: os.path.exists(path) and open(path).read().count("\n") >= 1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def assert_same_run(workdir, reference, model=None):
    """The same metrics (but seconds) and bit-identical latest params, statistics and Adam state
    (`model`: the runs' own model)."""
    assert without_seconds(metrics(workdir)) == without_seconds(metrics(reference))
    a, b = rj.restore(workdir, "latest", model=model), rj.restore(reference, "latest", model=model)
    jax.tree.map(
        np.testing.assert_array_equal,
        (a.params, a.batch_stats, a.opt_state),
        (b.params, b.batch_stats, b.opt_state),
    )
    return a


def metrics(workdir):
    """metrics.jsonl's records (resnet_jax's own reader)."""
    from resnet_jax.checkpoint import run_files

    return run_files.read_metrics(str(workdir))


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    # 96 train: 6 batches of 16, no partial batch (one train program less to compile in every
    # run: ~0.9 s a process, 2.4 s cold); the last partial batch has its own tests
    # (test_device_calls: the epoch plan, and a stop and resume across it; parallel_worker.py's
    # 62 images on two processes; test_compile_once).
    write_cifar(root, rows=(20, 20, 20, 20, 16), test_rows=40)
    return str(root)


@pytest.fixture(scope="session")
def full_run(archive, tmp_path_factory):
    """The README's command, offline and tiny: 3 epochs, uninterrupted."""
    workdir = str(tmp_path_factory.mktemp("run") / "ckpt")
    proc = train("--workdir", workdir, "--data_dir", archive, "--epochs", "3", *TINY)
    return proc, workdir


def pytest_sessionfinish(session, exitstatus):
    import shutil

    if OWNS_CACHE:
        shutil.rmtree(CACHE_HOME, ignore_errors=True)


# Fixtures that train a run (or build a wheel): a test using one is end-to-end, in the slow tier.
TRAINING_FIXTURES = {"full_run", "two_epochs", "two_seeds", "swept", "one_device", "built", "gpu_archive"}


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where JAX's default backend is a GPU (benchmarks/gpu.sh); a
    test that uses a training fixture is marked `slow` (the fast tier, -m "not slow", skips
    end-to-end stories)."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests and jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason=f"needs a GPU (JAX default backend is {jax.default_backend()})")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture
def compiled_as_users_compile(monkeypatch):
    """For the tests that train many steps: the programs compiled inside at XLA's default
    optimization level, as users' are (the session's level 0, above, slows a step 1.5-5x: a
    bfloat16 resnet20v2 step on digits 34 -> 158 ms, Zen 3)."""
    compile = jax.stages.Lowered.compile

    def at_level_2(self, compiler_options=None):
        return compile(
            self, compiler_options={**(compiler_options or {}), "xla_backend_optimization_level": 2}
        )

    monkeypatch.setattr(jax.stages.Lowered, "compile", at_level_2)


# The in-process tests' tiny Config (frozen: one value shared by the fixture and module fixtures).
TINY_CONFIG = rj.presets.tiny(batch_size=8, eval_batch_size=16)


@pytest.fixture
def tiny_config():
    return TINY_CONFIG


def random_dataset(n_train=64, n_test=24, shape=(32, 32, 3), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rj.Dataset(
        rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
        rng.integers(0, classes, n_train),
        rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
        rng.integers(0, classes, n_test),
        num_classes=classes,
    )


def random_batch(n=8, shape=(32, 32, 3), classes=10, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n,) + shape), jax.random.randint(k2, (n,), 0, classes)


def run_json(workdir):
    """run.json's record (resnet_jax's own reader; None for a workdir without one)."""
    from resnet_jax.checkpoint import run_files

    saved = run_files.read_run(str(workdir))
    return None if saved is None else saved[1]


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


def folder_hash(*folders):
    """A hash of every file's path and bytes under `folders` (absent ones hash as empty)."""
    h = hashlib.sha256()
    for folder in folders:
        for root, dirs, files in sorted(os.walk(folder)):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def assert_refused(workdir, args, message):
    """train.py with `args` on `workdir` ends in one line naming `message`, exit status 2, and
    touches nothing: the workdir is as it was, or still absent."""
    existed = os.path.exists(workdir)
    before = folder_hash(workdir) if existed else None
    proc = train("--workdir", workdir, *args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)
    assert (folder_hash(workdir) == before) if existed else not os.path.exists(workdir), args


def checkpoint_bytes(workdir):
    """A hash of every file under workdir/checkpoints (and its damaged-aside folder)."""
    return folder_hash(os.path.join(workdir, "checkpoints"), os.path.join(workdir, "checkpoints.damaged"))
