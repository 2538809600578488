"""The flags of the fastest run in a speed.py sweep (benchmarks/gpu.sh).

    python benchmarks/fastest.py SWEEP.jsonl TAG:FLAGS [TAG:FLAGS ...]

SWEEP.jsonl holds speed.py lines tagged `flags_TAG`; prints the FLAGS of the one that would run 50
epochs soonest (50 x its s/epoch + its compile time, which holds the CUDA graphs' creation: an
unrolled loop can make that long), or nothing (resnet_jax's defaults) when no line is there.
"""

import json
import sys


def fastest(rows, variants):
    flags = dict(v.split(":", 1) for v in variants)
    timed = [r for r in rows if r.get("tag", "").removeprefix("flags_") in flags]
    if not timed:
        return ""
    best = min(timed, key=lambda r: 50 * r["epoch_s"] + r["compile_s"])
    return flags[best["tag"].removeprefix("flags_")]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(fastest([json.loads(line) for line in f if line.strip()], sys.argv[2:]))
