"""Many hosts: jax.distributed with clear errors instead of hangs.

Every process runs the same `train.py` command. The coordinator address, process count and id
come from flags or from what JAX detects by itself (SLURM, Open MPI, TPU pods, Kubernetes);
process 0 writes logs and metrics, orbax writes checkpoints from all processes together.
"""

from __future__ import annotations

import socket
import time

import jax

from resnet_jax.errors import UserError


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 120,
):
    """jax.distributed.initialize with validated arguments and a bounded wait for the coordinator."""
    if num_processes is not None and num_processes <= 0:
        raise UserError(f"num_processes must be positive, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(
            f"process_id {process_id} is out of range for {num_processes} processes "
            f"(valid: 0..{num_processes - 1})"
        )
    if coordinator_address is not None and ":" not in coordinator_address:
        raise UserError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    if coordinator_address is not None and process_id not in (None, 0):
        # XLA aborts the whole process (no exception) when it cannot connect: look first.
        _wait_for(coordinator_address, timeout_s)
    # CPU devices of different processes talk through gloo (GPUs use NCCL on their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as e:  # noqa: BLE001 - JAX raises assorted runtime errors here
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot join the distributed run at {coordinator_address or 'the detected coordinator'}"
            f" within {timeout_s}s ({first}); check that process 0 is running and "
            "reachable, and the address, process count and id"
        ) from None


def _wait_for(address: str, timeout_s: float):
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"cannot reach the coordinator {address} within {timeout_s}s ({e.strerror or e}); "
                    "start process 0 first and check the address and port"
                ) from None
            time.sleep(0.5)
