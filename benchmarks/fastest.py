"""The flags of the fastest run in a speed.py sweep (benchmarks/gpu.sh).

    python benchmarks/fastest.py SWEEP.jsonl TAG:FLAGS [TAG:FLAGS ...]

SWEEP.jsonl holds speed.py lines tagged `flags_TAG`; prints the FLAGS of the one with the most
train images/s, or nothing (resnet_jax's defaults) when no line is there.
"""

import json
import sys


def fastest(rows, variants):
    flags = dict(v.split(":", 1) for v in variants)
    timed = [r for r in rows if r.get("tag", "").removeprefix("flags_") in flags]
    if not timed:
        return ""
    best = max(timed, key=lambda r: r["train_images_per_s"])
    return flags[best["tag"].removeprefix("flags_")]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(fastest([json.loads(line) for line in f if line.strip()], sys.argv[2:]))
