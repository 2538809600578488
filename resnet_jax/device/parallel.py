"""Data parallelism with jax.jit over a Mesh: state and dataset replicated, batches sharded."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import tuning
from resnet_jax.errors import UserError

AXIS = "data"


def make_mesh(devices=None, *, per_process: int | None = None) -> Mesh:
    """A 1-D mesh named 'data' over all devices of all processes, or the given ones, or the
    first `per_process` devices of each process (a run's own choice: resnet_jax.tuning.run_devices)."""
    if devices is None:
        devices = jax.devices()
        if per_process is not None:
            devices = [
                d
                for p in range(jax.process_count())
                for d in jax.local_devices(process_index=p)[:per_process]
            ]
    return Mesh(np.asarray(list(devices)), (AXIS,))


def step_flops(config, image_shape, model=None) -> float | None:
    """A run's step's forward FLOPs (model.resnet.step_flops), None for a model that cannot be
    traced abstractly (its size is then unknown)."""
    from resnet_jax.model import resnet

    try:
        return resnet.step_flops(config, image_shape, model)
    except Exception:  # noqa: BLE001 - a user's model that eval_shape cannot trace
        return None


def run_mesh(platform, config, image_shape, model=None) -> Mesh:
    """The mesh of a run (or an evaluation) of `config` on `image_shape` with `model` (None: the
    Config's ResNet): as many of each process's devices as the run decides (tuning.run_devices)."""
    flops = step_flops(config, image_shape, model)
    count = tuning.run_devices(platform, config.batch_size, flops, jax.local_device_count())
    return make_mesh(per_process=count)


def advice(config, image_shape=(32, 32, 3), model=None) -> str | None:
    """One line for a notebook whose JAX started before resnet_jax.process.setup: how to get the
    command line's CPU speed for this run's model. None when nothing is to gain."""
    if jax.default_backend() != "cpu" or jax.device_count() >= tuning.cores():
        return None  # nothing to gain (and no model to trace)
    flops = step_flops(config, image_shape, model)
    if flops is None:
        return None
    want = tuning.auto_cpu_devices(tuning.cores(), config.batch_size, flops)
    have = jax.device_count()
    if want <= have:
        return None
    return (
        f"note: JAX runs this CPU as {have} device(s); train.py would use {want} (one per core) "
        f"for about 1.5x the speed: call resnet_jax.configure() before any other JAX work (e.g. "
        f"first in the notebook), and start Jupyter with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
        f"for huge-page malloc"
    )


def describe(mesh: Mesh) -> dict:
    """What run.json records of a run's devices: the platform, the kind, how many the run used
    and how many the processes had."""
    device = mesh.devices.flat[0]
    return {
        "platform": device.platform,
        "kind": device.device_kind,
        "count": mesh.size,
        "of": jax.device_count(),
    }


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
