"""What XLA:GPU makes of one train step, without a GPU: the kernels a step launches.

    pip install "jax[cuda13]"    # the CUDA plugin; no GPU needed
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python experiments/gpu_kernels/gpu_hlo.py [--batch_size 32]
        [--dtype float32] [--preset NAME] [--steps_per_call 100] [--target h200|h100] [--hlo FILE]

(JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1: without a GPU the plugin cannot load CUPTI to check versions.)

Compiles the training loop's device call (`programs._train_chunk`, a lax.scan of train steps) for
an NVIDIA Hopper GPU with XLA's deviceless (compile-only) GPU client and prints one JSON line: the
kernels one step (the loop's body) launches, by kind (cuDNN convolutions, reductions, elementwise
fusions, copies, matmuls) and by the part of the step they come from (model forward/backward, L2
penalty, optimizer, augmentation). A batch-32 step of the seed model is bound by how many kernels
it launches, not by arithmetic (docs/performance.md), so this count is what a change to the step
should move; a GPU measures the rest. Takes seconds; `--hlo` writes the optimized HLO too.

Caveats: without a device XLA cannot autotune, so convolution algorithms and GEMM backends are
its heuristics' choice (Triton GEMMs are switched off here: jax 0.11 cannot configure them without
a device), and the count is of HLO kernels, not of what command buffers or cuDNN run inside them.
XLA_FLAGS apply as on a GPU: the user's, then resnet_jax.tuning's GPU flags (set in main, before
JAX starts a backend). The model flags are speed.py's (benchmarks/common.py).
"""

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)  # what the benchmarks share: keras_baseline, common, jsonl, hlo_text

import collections
import functools
import json
import re

import jax
import jax.numpy as jnp
from common import computations, first_match, model_config, op_of, parse, parser
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import resnet_jax as rj
from resnet_jax import checkpoint, process, tuning
from resnet_jax.device import batches, programs
from resnet_jax.device import data as device_data

TARGETS = {
    "h200": dict(cores=132, bandwidth=4_800_000_000_000, memory=150_000_000_000, name="NVIDIA H200"),
    "h100": dict(cores=132, bandwidth=3_352_320_000_000, memory=84_929_347_584, name="NVIDIA H100 80GB HBM3"),
}

TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {cores}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""

NO_KERNEL = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "call", "while",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
}  # fmt: skip


SOURCES = (
    ("model backward", r"transpose\(jvp\(ResNet"),
    ("model forward", r"jvp\(ResNet"),
    ("L2 penalty", r"jvp\(\)"),
    ("augmentation and keys", r"threefry|_uniform|_bernoulli|einsum|bri,|bcj,"),
    ("optimizer", r"/(mul|add|sub|div|sqrt|exp|integer_pow)\b"),
)


def source(text):
    """Which part of the train step a kernel's jax op names come from."""
    return first_match(" ".join(re.findall(r'op_name="([^"]*)"', text)), SOURCES, "other")


def kind(line, body):
    """The kind of kernel one instruction of a scheduled GPU module launches."""
    op = op_of(line)
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
        if "cudnn" in target and "conv" in target.lower():
            return "convolution (cuDNN)"
        return "matmul (cuBLAS)" if re.search(r"gemm|cublas", target, re.I) else f"custom-call {target}"
    if op != "fusion":
        return op
    if 'custom_call_target="__cudnn' in body:
        return "cuDNN fusion"
    if '"kind":"__triton' in line:
        return "matmul (Triton)" if " dot(" in body else "Triton fusion"
    if " reduce(" in body:
        return "reduction"
    if not re.search(r" (add|multiply|subtract|divide|select|maximum|exponential|rsqrt|compare)\(", body):
        return "copy/transpose/slice"
    return "elementwise"


def kernels(comps, name, seen=()):
    """Counters (by kind, by source) of the kernels computation `name` launches, descending into
    calls and conditionals (not into while loops: those are counted by their body)."""
    kinds, sources = collections.Counter(), collections.Counter()
    for line in comps.get(name, []):
        op = op_of(line)
        if op is None or op in NO_KERNEL or op.endswith("-done"):
            if op in ("call", "conditional"):
                for callee in re.findall(
                    r"(?:to_apply|calls|branch_computations)=\{?([^}]*?)\}?(?:,|$)", line
                ):
                    for c in re.findall(r"%?([\w.\-]+)", callee):
                        if c in comps and c not in seen:
                            k, s = kernels(comps, c, seen + (name,))
                            kinds += k
                            sources += s
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        body = "\n".join(comps.get(calls.group(1), [])) if calls and op == "fusion" else ""
        kinds[kind(line, body)] += 1
        sources[source(body or line)] += 1
    return kinds, sources


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--target", default="h200", choices=sorted(TARGETS))
    p.add_argument("--tag", default="")
    p.add_argument("--hlo", help="also write the optimized HLO text here")
    a = parse(p)

    # As on a GPU: the user's XLA_FLAGS, then resnet_jax's; and Triton GEMMs off, since without a
    # device XLA cannot autotune them (jax 0.11 fails to compile; the few small GEMMs of the head
    # and the augmentation become cuBLAS calls instead, one kernel each either way).
    flags = tuning.GPU_XLA_FLAGS + ("--xla_gpu_enable_triton_gemm=false",)
    os.environ["XLA_FLAGS"] = process.merge_xla_flags(os.environ.get("XLA_FLAGS", ""), flags)
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=TARGET_CONFIG.format(**TARGETS[a.target]), topology="1x1x1"
    )
    mesh = topologies.make_mesh(topo=topology, mesh_shape=(1,), axis_names=(rj.device.parallel.AXIS,))
    config = model_config(a, batch_size=a.batch_size, dtype=a.dtype, steps_per_call=a.steps_per_call)
    n_train, spe = 50_000, batches.steps_per_epoch(50_000, a.batch_size)
    model = rj.model.resnet.from_config(config, materialize=tuning.decide("gpu").materialize)
    state = checkpoint.template(model, rj.model.optim.make_optimizer(config, spe), config, (32, 32, 3))
    on_gpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))
    state = jax.tree.map(on_gpu, state)
    data = device_data.DeviceData(
        *(on_gpu(jax.ShapeDtypeStruct(s, d)) for s, d in (
            ((n_train, 32, 32, 3), jnp.uint8), ((n_train,), jnp.int32), ((10_000, 32, 32, 3), jnp.uint8),
            ((10_000,), jnp.int32), ((10_000,), jnp.float32), ((32, 32, 3), jnp.float32)))
    )  # fmt: skip
    perm = on_gpu(jax.ShapeDtypeStruct((n_train,), jnp.int32))
    key = on_gpu(jax.eval_shape(lambda: jax.random.key(0)))
    scalar = on_gpu(jax.ShapeDtypeStruct((), jnp.int32))
    step = jax.jit(functools.partial(programs._train_chunk, mesh=mesh), static_argnames=("length", "batch"))
    compiled = step.lower(
        state, data, perm, scalar, scalar, key, length=a.steps_per_call, batch=a.batch_size
    ).compile()
    text = compiled.as_text()
    if a.hlo:
        open(a.hlo, "w").write(text)
    comps = computations(text)
    loops = [line for c in comps.values() for line in c if op_of(line) == "while"]
    body = (
        re.search(r"body=%?([\w.\-]+)", loops[0]).group(1)
        if loops
        else re.search(r"ENTRY %?([\w.\-]+)", text).group(1)
    )
    by_kind, by_source = kernels(comps, body)
    print(json.dumps({
        "what": "gpu_step_kernels", "target": TARGETS[a.target]["name"], "jax": jax.__version__,
        "model": rj.model.resnet.name(config), "batch_size": a.batch_size, "dtype": a.dtype, "tag": a.tag,
        "batchnorm_derivative": a.batchnorm_derivative,
        "kernels_per_step": sum(by_kind.values()), "by_kind": dict(by_kind.most_common()),
        "by_source": dict(by_source.most_common()), "while_loops": len(loops),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
