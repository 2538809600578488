"""A sweep with workers against one after another: the same command with --workers 1 and
--workers auto, fresh workdirs, alternated, after one warm-up of each (the compilation and
decoded-image caches warm), and every run's metrics compared between the two.

    python benchmarks/workers.py --data_dir ARCHIVE [--repeats 1] [--out FILE] -- TRAIN_FLAGS...

e.g. `-- --preset tiny --epochs 3 --sweep learning_rate=0.001,0.002,0.003,0.004 --seeds 0`.
One JSON line per timed command, then one with the ratio and whether the metrics were identical.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metrics(workdir: str) -> dict:
    """{run folder: its metrics.jsonl lines without seconds}."""
    out = {}
    for root, _, files in os.walk(workdir):
        if "metrics.jsonl" in files:
            with open(os.path.join(root, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            out[os.path.relpath(root, workdir)] = [
                {k: v for k, v in r.items() if k != "seconds"} for r in rows
            ]
    return out


def timed(flags, workers: str, scratch: str):
    workdir = tempfile.mkdtemp(dir=scratch)
    began = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--workdir",
            workdir,
            "--workers",
            workers,
            "--quiet",
            *flags,
        ],
        check=True,
    )
    return time.perf_counter() - began, metrics(workdir), workdir


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("flags", nargs="*")
    args = p.parse_args()
    flags = ["--data_dir", args.data_dir, *args.flags]
    scratch = tempfile.mkdtemp()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    machine = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "flags": " ".join(args.flags)}
    for workers in ("1", "auto"):  # warm-up: caches, page cache
        shutil.rmtree(timed(flags, workers, scratch)[2])
    seconds, seen = {"1": [], "auto": []}, {}
    for _ in range(args.repeats):
        for workers in ("1", "auto"):
            took, found, workdir = timed(flags, workers, scratch)
            seconds[workers].append(took)
            seen.setdefault(workers, found)
            emit({"what": "sweep", "workers": workers, "seconds": round(took, 1), **machine}, args.out)
            shutil.rmtree(workdir)
    one, auto = statistics.median(seconds["1"]), statistics.median(seconds["auto"])
    same = seen["1"] == seen["auto"] and bool(seen["1"])
    emit(
        {"what": "workers speedup", "ratio": round(one / auto, 3), "identical_metrics": same, **machine},
        args.out,
    )
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
