"""What a long-lived notebook keeps: resident memory of a process after a train_and_evaluate call
returns (and after a second one), with resnet_jax's malloc settings and without
(RESNET_JAX_MALLOC=0), each in a fresh process.

    python experiments/notebook_memory/notebook_memory.py [--n_train 4000] [--out FILE]

One JSON line per setting: peak resident memory (VmHWM), resident memory after the first call
returned and after a second call, in MiB; the model is the seed ResNet, one epoch of CIFAR-shaped
random data.
"""

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)  # what the benchmarks share: keras_baseline, common, jsonl, hlo_text

import argparse
import json
import subprocess
import textwrap

from common import emit

CHILD = textwrap.dedent("""
    import gc, json, sys, tempfile
    import numpy as np
    import resnet_jax as rj
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) // 1024
    n = int(sys.argv[1])
    rng = np.random.default_rng(0)
    ds = rj.Dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                    rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 1000))
    out = {}
    for call in ("first", "second"):
        state, _ = rj.train_and_evaluate(rj.Config(epochs=1), tempfile.mkdtemp(), ds, verbosity=0)
        del state
        gc.collect()
        out[f"rss_after_{call}_mb"] = status("VmRSS:")
    out["peak_rss_mb"] = status("VmHWM:")
    out["malloc"] = rj.tuning._malloc["done"]
    print(json.dumps(out))
""")


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--n_train", type=int, default=4000)
    p.add_argument("--out")
    a = p.parse_args()
    for setting in ("1", "0"):
        env = dict(os.environ, RESNET_JAX_MALLOC=setting, JAX_PLATFORMS="cpu")
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(a.n_train)], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            sys.exit(proc.stderr[-2000:])
        emit(
            {
                "what": "notebook_memory",
                "n_train": a.n_train,
                **json.loads(proc.stdout.strip().splitlines()[-1]),
            },
            a.out,
        )


if __name__ == "__main__":
    main()
