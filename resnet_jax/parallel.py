"""Data parallelism with jax.jit over a Mesh: state and dataset replicated, batches sharded."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import UserError

AXIS = "data"


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
        raise UserError(
            f"batch_size {batch_size} cannot be split over {n} devices; use a multiple "
            f"of {n} (e.g. {valid}, ...)"
        )


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
