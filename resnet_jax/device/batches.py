"""Which images each step of an epoch trains on, and how the steps group into device calls.

Randomness: epoch e's key is fold_in(data_key, e), split into a permutation key and an
augmentation key; step i of the epoch augments with fold_in(augmentation key, i). So the data
of any step of any epoch can be recomputed from (data_key, epoch, step): a run resumed
mid-epoch sees the same batches. Calls end at multiples of steps_per_call, so a run resumed at
a call boundary makes the same calls as one that never stopped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Full batches plus one partial batch if the data does not divide (kept, as Keras does)."""
    return -(-num_train // batch_size)


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    return jax.random.fold_in(data_key, epoch)


@functools.partial(jax.jit, static_argnums=1)
def permutation(key: jax.Array, n: int) -> jax.Array:
    return jax.random.permutation(jax.random.split(key)[0], n).astype(jnp.int32)


def chunk_rows(perm, offset, length: int, batch: int):
    """Dataset indices of `length` consecutive batches starting at perm[offset]: (length, batch)."""
    return jax.lax.dynamic_slice_in_dim(perm, offset, length * batch).reshape(length, batch)


def next_call(num_train: int, batch_size: int, steps_per_call: int, step: int):
    """(offset, step, length, batch) of the device call that starts at `step` of an epoch: it
    ends at the next multiple of steps_per_call; the partial batch is a call of its own."""
    full = num_train // batch_size
    if step < full:
        return step * batch_size, step, min(steps_per_call - step % steps_per_call, full - step), batch_size
    return full * batch_size, full, 1, num_train % batch_size


def epoch_plan(num_train: int, batch_size: int, steps_per_call: int, start_step: int = 0):
    """Every device call of one epoch (see `next_call`), from `start_step` on."""
    calls, step = [], start_step
    while step < steps_per_epoch(num_train, batch_size):
        calls.append(next_call(num_train, batch_size, steps_per_call, step))
        step += calls[-1][2]
    return calls


def call_shapes(num_train: int, config, step: int = 0) -> set:
    """(length, batch) of every device call of a whole epoch, and of an epoch from `step` on (a
    resumed run's first)."""
    plans = epoch_plan(num_train, config.batch_size, config.steps_per_call)
    plans += epoch_plan(num_train, config.batch_size, config.steps_per_call, step)
    return {(length, batch) for _, _, length, batch in plans}
