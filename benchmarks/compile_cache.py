"""Compile once: time to `Epoch 1/` of train.py with an empty compilation cache, then again with the
cache the first run left (another workdir, another process), for a few models.

    python benchmarks/compile_cache.py [--models seed,tiny] [--repeats 1] [--out FILE]

Each run is stopped once it prints `Epoch 1/` (the first train step is next). One JSON line per
run: model, cold or cached, seconds to `Epoch 1/`, and train.py's own `Compiled in` figure. The
data is a CIFAR-shaped synthetic archive (compiling does not depend on the pixels).
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from common import emit, random_cifar

import resnet_jax as rj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "seed": [],
    "tiny": ["--num_filters", "4", "--stage_sizes", "1,1,1"],
    "resnet20v1": ["--preset", "resnet20v1"],
}


def to_epoch_1(flags, archive, cache_home):
    """Seconds from the start of train.py to its `Epoch 1/` line, and its `Compiled in` figure."""
    env = dict(os.environ, XDG_CACHE_HOME=cache_home, PYTHONUNBUFFERED="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--workdir",
        tempfile.mkdtemp(),
        "--data_dir",
        archive,
        "--verbose",
        "1",
        *flags,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    compiled = None
    for line in proc.stdout:
        if m := re.match(r"Compiled in ([\d.]+) s", line):
            compiled = float(m.group(1))
        if line.startswith("Epoch 1/"):
            seconds = time.perf_counter() - start
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seconds, compiled
    raise SystemExit(f"train.py ended before Epoch 1 ({proc.wait()})")


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--models", default="seed,tiny")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out")
    a = p.parse_args()
    archive = rj.data.cifar_archive.write_archive(tempfile.mkdtemp(), random_cifar(5000, 1000))
    for _ in range(a.repeats):
        for name in a.models.split(","):
            cache_home = tempfile.mkdtemp(prefix="compile_cache_")
            for kind in ("cold", "cached"):
                seconds, compiled = to_epoch_1(MODELS[name], archive, cache_home)
                emit(
                    {
                        "what": "compile_cache",
                        "model": name,
                        "cache": kind,
                        "seconds_to_epoch_1": round(seconds, 1),
                        "compiled_in": compiled,
                    },
                    a.out,
                )


if __name__ == "__main__":
    main()
