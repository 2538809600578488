"""Data parallelism with jax.jit over a Mesh: state and dataset replicated, batches sharded."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.errors import UserError

AXIS = "data"


# Below this many forward FLOPs per step, one CPU device beats one per core: the step is
# made of small ops and the cross-device BatchNorm sums cost more than the second core gives back.
# Measured on 2 cores, batch 32 (`benchmarks/speed.py --cpu_devices 1|2`, images/s):
#   4 filters 1,1,1 (0.06 GFLOP/step): 2,565 vs 2,114     8 filters 1,1,1 (0.21): 2,059 vs 1,718
#   8 filters 3,3,2 (0.58):            513 vs 676         16 filters 1,1,1 (0.80): 839 vs 1,046
#   seed, 32 filters 3,3,2 (9.2):      86 vs 130
SPLIT_MIN_FLOPS = 3.5e8


def auto_cpu_devices(cores: int, batch_size: int, flops_per_step: float | None = None) -> int:
    """One device per core (the largest divisor of batch_size not above `cores`), or one device
    when the step's forward pass is smaller than SPLIT_MIN_FLOPS."""
    if flops_per_step is not None and flops_per_step < SPLIT_MIN_FLOPS:
        return 1
    return max(d for d in range(1, max(cores, 1) + 1) if batch_size % d == 0)


def configure_cpu_devices(setting, batch_size: int, flops_per_step: float | None = None) -> int | None:
    """Split the CPU into several JAX devices, one per core, before JAX starts its backends.

    XLA:CPU runs many of a step's ops on one thread; data parallelism over per-core CPU devices
    keeps every core busy (seed model on 2 cores: 86 -> 130 images/s, README "Speed"). `setting`
    is "auto" (`auto_cpu_devices`; pass the forward FLOPs of one step, batch_size x
    `models.forward_flops`, so small models stay on one device) or a number. A count already set
    through XLA_FLAGS or JAX_NUM_CPU_DEVICES wins. GPUs and TPUs are unaffected.
    """
    import os

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or \
            os.environ.get("JAX_NUM_CPU_DEVICES"):
        return None
    if setting == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = auto_cpu_devices(cores or 1, batch_size, flops_per_step)
    else:
        try:
            n = int(setting)
        except ValueError:
            n = 0
        if n <= 0:
            raise UserError(f"cpu_devices must be 'auto' or a positive integer, got {setting!r}")
    jax.config.update("jax_num_cpu_devices", n)
    return n


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over all devices of all processes (or the given ones)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh):
    n = mesh.size
    if batch_size % n:
        valid = ", ".join(str(n * k) for k in range(1, 5))
        raise UserError(f"batch_size {batch_size} cannot be split over {n} devices; use a multiple "
                        f"of {n} (e.g. {valid}, ...)")


def replicate(tree, mesh: Mesh):
    """Place host arrays (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def constrain_batch(x, mesh: Mesh):
    """Shard a batch's leading axis over the mesh when it divides evenly (else leave it to XLA)."""
    if x.shape[0] % mesh.size == 0:
        return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))
    return x
