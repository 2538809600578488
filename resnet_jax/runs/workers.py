"""Workers: a sweep's runs trained by several processes at once, on a machine its runs leave
partly idle (a small model's run uses one CPU device, one core's worth, of several).

Workers are processes running the same sweep (`python -m resnet_jax ... --workers 1`), which
claim its runs through each run's workdir lock, as two shell commands sharing a sweep already
do: no scheduler of their own. Each starts JAX on the whole machine, as a run alone does (a
run's devices, and XLA:CPU's thread pool, which decides how a computation is split and so its
rounding, are the run alone's), then keeps its threads on its share of the cores
(resnet_jax.process, RESNET_JAX_WORKER_CORES), except while it compiles (XLA:CPU also splits a
program by the cores it may use then): a worker's run is that run alone bit for bit (pinned
before JAX starts, or while compiling, the numbers changed: docs/performance.md).

The parent trains nothing. It prints one console (each run's start and result, then the table),
writes the summary once, on Ctrl-C or SIGTERM stops its workers (each saves, as a run does),
and when a worker dies ends with one line naming its run (every checkpoint is kept).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time

from resnet_jax import tuning
from resnet_jax.config import TUPLE_SEPARATOR, Config
from resnet_jax.errors import Interrupted, MachineFault, UserError

RUN_START = re.compile(r"^=== (?P<name>.+) \((?P<i>\d+) of (?P<n>\d+)\) -> (?P<folder>.+)$")
RESULT = re.compile(r"^Test accuracy: (?P<acc>\S+)$")


def decide(platform, configs, image_shape, model=None, cores: int | None = None) -> int:
    """How many runs at once: on a CPU, the cores divided by the devices (a core each) the sweep's
    largest run uses alone; one elsewhere (on GPUs a run uses every device: a worker per GPU would
    change its numbers) and for your own model, which cannot be sent to another process."""
    from resnet_jax.device import parallel

    if platform.name != "cpu" or model is not None:
        return 1
    cores = tuning.cores() if cores is None else cores
    devices = max(
        tuning.run_devices(platform, c.batch_size, parallel.step_flops(c, image_shape), cores, cores)
        for c in configs
    )
    return max(1, cores // devices)


def count(asked, platform, configs, image_shape, kwargs, runs: int) -> int:
    """How many runs train at once: `asked` (a count, or auto: resnet_jax.runs.workers.decide),
    never more than there are runs; one for your own parts (they stay in this process) and
    for a multi-host run."""
    import jax

    own = [k for k in ("model", "optimizer", "augment", "callbacks") if kwargs.get(k)]
    if asked in (None, "auto"):
        if own or jax.process_count() > 1 or runs < 2:
            return 1
        return min(runs, decide(platform, configs, image_shape))
    try:
        count = int(asked)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise UserError(f"workers must be 'auto' or a positive integer, got {asked!r}")
    if count > 1 and own:
        raise UserError(
            f"your own {', '.join(own)} cannot be sent to worker processes; pass workers=1 to train "
            "the runs one after another in this process"
        )
    return 1 if jax.process_count() > 1 else min(count, max(runs, 1))


def command(config: Config, workdir: str, grid, seeds, data_dir: str, shard=None, verbosity: int = 1):
    """The worker's command line for a sweep given from Python: the Config's fields that differ
    from the defaults as flags, the grid, the seeds, the data."""
    args = [sys.executable, "-m", "resnet_jax", "--workdir", workdir, "--data_dir", data_dir]
    skip = {"dataset", "data_dir", "num_classes", "class_names"} | {name for name, _ in grid}
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if f.name in skip or value == f.default:
            continue
        if isinstance(value, bool):
            args.append(f"--{f.name}" if value else f"--no-{f.name}")
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            args += [f"--{f.name}", text]
    for name, values in grid:
        text = lambda v: TUPLE_SEPARATOR.join(map(str, v)) if isinstance(v, tuple) else str(v)
        args += ["--sweep", f"{name}={','.join(text(v) for v in values)}"]
    args += ["--seeds", ",".join(map(str, seeds))]
    if shard is not None:
        args += ["--shard", f"{shard[0]}/{shard[1]}"]
    return args + ["--verbose", str(min(verbosity, 1))]


def dataset_file(dataset, workdir: str) -> str:
    """An in-memory Dataset as a file workers read (data_dir=...npz), named by its fingerprint."""
    folder = os.path.join(workdir, ".workers")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"dataset-{dataset.fingerprint()}.npz")
    if not os.path.exists(path):
        dataset.save(path)
    return path


class Worker:
    """One worker process and what its output says: the run it trains, the runs it finished."""

    def __init__(self, number: int, argv, console, lock, cores=()):
        self.number, self.console, self.lock = number, console, lock
        self.current, self.finished, self.output = None, [], []
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the parent forwards a stop: a terminal's Ctrl-C reaches it once
            env=dict(os.environ, PYTHONUNBUFFERED="1", **_pinned(cores)),
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, ""):
            line = line.rstrip("\n")
            self.output = (self.output + [line])[-20:]
            start, result = RUN_START.match(line), RESULT.match(line)
            if start:
                self.current = (start["name"], start["folder"], time.monotonic())
            elif result and self.current is not None:
                name, folder, began = self.current
                self.finished.append(folder)
                self.current = None
                with self.lock:
                    self.console.line(
                        f"[worker {self.number}] {name}: test accuracy {float(result['acc']):.4f} "
                        f"({time.monotonic() - began:.0f} s)"
                    )
            elif line.startswith("Epoch 1/") and self.current is not None:
                with self.lock:
                    self.console.line(f"[worker {self.number}] {self.current[0]} -> {self.current[1]}")


def run(argv, count: int, console, stop) -> None:
    """`count` workers running `argv` (each with --workers 1), until every run is done, a stop is
    asked (Interrupted, once each worker saved) or a worker dies (MachineFault naming its run)."""
    argv = list(argv) + ["--workers", "1"]
    lock = threading.Lock()
    shares = _shares(count)
    workers = [Worker(k + 1, argv, console, lock, shares[k]) for k in range(count)]
    stopping = False
    try:
        while any(w.proc.poll() is None for w in workers):
            if stop.is_set() and not stopping:
                stopping = True
                for w in workers:
                    if w.proc.poll() is None:
                        w.proc.send_signal(signal.SIGTERM)  # each saves after its device call
            dead = [w for w in workers if w.proc.poll() not in (None, 0, 130) and not stopping]
            if dead:
                _stop(workers)
                raise MachineFault(_death(dead[0]))
            time.sleep(0.1)
    except BaseException:
        _stop(workers)
        raise
    for w in workers:
        w.reader.join(timeout=10)
    failed = [w for w in workers if w.proc.returncode not in (0, 130)]
    if failed and not stopping:
        raise MachineFault(_death(failed[0]))
    if stopping or any(w.proc.returncode == 130 for w in workers):
        where = ", ".join(w.current[1] for w in workers if w.current is not None) or "its runs' workdirs"
        raise Interrupted("with every worker saved", where)
    user = [w for w in workers if w.proc.returncode == 2]
    if user:
        raise UserError(user[0].output[-1].removeprefix("error: ") if user[0].output else "a worker refused")


def _shares(count: int) -> list:
    """The cores of each of `count` workers: this process's, in `count` contiguous groups."""
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(mine) < count:
        return [()] * count
    size = len(mine) // count
    return [tuple(mine[k * size : (k + 1) * size]) for k in range(count)]


def _pinned(cores) -> dict:
    from resnet_jax.process import WORKER_CORES

    return {WORKER_CORES: ",".join(map(str, cores))} if cores else {}


def _stop(workers):
    """Stop the workers still running (SIGTERM: each saves), then wait for them."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def _death(worker) -> str:
    code = worker.proc.returncode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    name, folder = (worker.current or ("no run", "its sweep"))[:2]
    last = next((line for line in reversed(worker.output) if line.strip()), "")
    said = f"; it said: {last[:160]}" if code > 0 and last else ""
    return (
        f"worker {worker.number} stopped ({how}) while training {name} in {folder}{said}; every "
        "checkpoint is kept: run the same command to resume"
    )
