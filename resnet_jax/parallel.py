"""Data parallelism with jax.jit over a Mesh: state and dataset replicated, batches sharded."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.errors import UserError

AXIS = "data"


def configure_cpu_devices(setting, batch_size: int) -> int | None:
    """Split the CPU into several JAX devices, one per core, before JAX starts its backends.

    XLA:CPU runs many of a step's ops on one thread; data parallelism over per-core CPU devices
    keeps every core busy (seed model on 2 cores: 91 -> 133 images/s, README "Speed"). `setting`
    is "auto" (the largest divisor of batch_size not above the core count) or a number. A count
    already set through XLA_FLAGS or JAX_NUM_CPU_DEVICES wins. GPUs and TPUs are unaffected.
    """
    import os

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or \
            os.environ.get("JAX_NUM_CPU_DEVICES"):
        return None
    if setting == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = max(d for d in range(1, max(cores or 1, 1) + 1) if batch_size % d == 0)
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
