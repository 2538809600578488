"""Where one train step spends its time, op by op (XLA:CPU thunks, or GPU kernels).

    python benchmarks/profile_step.py [--num_filters 32] [--stage_sizes 3,3,2] [--steps 10] [--top 15]

Runs the jitted train step under the JAX profiler (a Perfetto trace, no TensorBoard needed) and
prints one JSON line: wall ms a step, how many ops ran a step and their summed time (the rest of
the wall time is dispatch overhead between ops), the time per kind of op (convolution,
transpose, reduction, elementwise), and the slowest ops with the jax operation they came from.
With several devices (one per core on CPU) op times are summed over the devices: divide by
`devices` for one device's share of the wall time.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
from common import configure_devices, first_match, model_config, parse, parser, random_cifar, setup

import resnet_jax as rj
from resnet_jax.device import parallel

WRAPPERS = (
    "ThunkExecutor",
    "$",
    "Pjit",
    "Common",
    "Parse",
    "Slinky",
    "Handle",
    "Thunk",
    "end: ",
    "Allocate",
    "Wait for",
)


def hlo_ops(text):
    """{instruction name: (shape, jax op name, runs a convolution)} from compiled HLO text.

    Whether an op is a convolution is read off the HLO (the op itself or the fusion it calls),
    not off its jax op name: XLA drops the name of weight-gradient convolutions and keeps
    "conv" in the names of the transposes and elementwise ops around them."""
    conv_computations = set()
    computation = None
    for line in text.splitlines():
        head = re.match(r"%?([\w.\-]+) \(.*\{$", line)
        if head:
            computation = head.group(1)
        elif computation and re.search(r" convolution\(", line):
            conv_computations.add(computation)
    ops = {}
    for line in text.splitlines():
        m = re.match(r"\s*%?([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            op_name = op.group(1) if op else ""
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            is_conv = " convolution(" in line or bool(calls and calls.group(1) in conv_computations)
            ops[m.group(1)] = (m.group(2), op_name, is_conv)
    return ops


KINDS = (
    ("transpose", r"transpose|copy"),
    ("reduction", r"reduce"),
    ("collective", r"all-reduce|all-gather|collective"),
)


def kind(name, is_conv):
    return "convolution" if is_conv else first_match(name, KINDS, "elementwise/other")


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=15)
    a = parse(p)
    configure_devices(a, model_config(a, batch_size=a.batch_size))
    _, mesh, _, state, _, _ = setup(a, random_cifar(4 * a.batch_size, a.batch_size), batch_size=a.batch_size)
    images = jax.device_put(
        jax.random.normal(jax.random.key(0), (a.batch_size, 32, 32, 3)), parallel.batch_sharded(mesh)
    )
    labels = jax.device_put(
        jax.random.randint(jax.random.key(1), (a.batch_size,), 0, 10), parallel.batch_sharded(mesh)
    )
    step = jax.jit(rj.train_step, donate_argnums=0)
    ops = hlo_ops(step.lower(state, images, labels).compile().as_text())
    for _ in range(3):
        state, m = step(state, images, labels)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(a.steps):
        state, m = step(state, images, labels)
    jax.block_until_ready(m)
    wall_ms = (time.perf_counter() - start) / a.steps * 1e3

    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(a.steps):
        state, m = step(state, images, labels)
        jax.block_until_ready(m)
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    events = json.load(gzip.open(trace))["traceEvents"]
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(WRAPPERS):
            total[e["name"]] += e["dur"] / 1e3 / a.steps
            count[e["name"]] += 1
    by_kind = collections.Counter()
    for name, ms in total.items():
        by_kind[kind(name, ops.get(name, ("", "", False))[2])] += ms
    top = [
        {
            "op": n,
            "ms": round(ms, 3),
            "shape": ops.get(n, ("?",))[0],
            "from": ops.get(n, ("", ""))[1][-80:]
            or ("convolution" if ops.get(n, ("", "", False))[2] else ""),
        }
        for n, ms in total.most_common(a.top)
    ]
    print(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "devices": mesh.size,
                "model": rj.model.resnet.name(model_config(a)),
                "batch_size": a.batch_size,
                "wall_ms_per_step": round(wall_ms, 2),
                "ops_per_step": round(sum(count.values()) / a.steps),
                "op_ms_per_step": round(sum(total.values()), 2),
                "ms_by_kind": {k: round(v, 2) for k, v in by_kind.most_common()},
                "top_ops": top,
            }
        )
    )


if __name__ == "__main__":
    main()
