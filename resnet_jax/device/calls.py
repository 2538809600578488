"""The device-call queue of an epoch: train calls handed to the devices ahead of the host.

A train call (`programs.TrainCall`) runs many steps on the devices. On the scan loop it returns
at once (JAX dispatches asynchronously) and its metrics reach the host when they are read; on the
python loop (CPU) it dispatches its steps one by one and returns when they are done. `run` keeps
`pace.ahead` calls queued behind the one being read, so the devices never wait for the host
between calls (reading metrics, a thread holding the GIL), and reads each call's metrics in
order, handing them to `on_metrics` (which may raise: the loop's NaN check). A stop request
sends no new call, drains the calls in flight and ends the epoch at that call boundary.
"""

from __future__ import annotations

import collections
import time

import jax


class Pace:
    """Steps per device call, and calls queued ahead. On the scan loop (accelerators): the
    config's steps_per_call, calls aligned to it, one call queued behind the one being read. On
    the python loop (CPU; one jitted call per step, dispatched asynchronously): as many steps as
    fit in about `seconds`, so the progress bar moves and a stop request is seen that often,
    and none queued (each call is already many asynchronous steps)."""

    def __init__(self, loop: str, steps_per_call: int, seconds: float = 0.5):
        self.loop, self.cap, self.seconds = loop, steps_per_call, seconds
        self.steps = steps_per_call if loop == "scan" else 1  # a call's steps, now
        self.ahead = 1 if loop == "scan" else 0

    def update(self, length: int, elapsed: float):
        if self.loop == "python" and elapsed > 0:
            self.steps = int(min(self.cap, max(1, round(self.seconds * length / elapsed))))


def run(state, call, plan, start: int, steps: int, pace: Pace, stop, on_metrics):
    """Train steps `start`..`steps` of an epoch; returns (state, the step reached).

    `call(state, offset, step, length, batch) -> (state, device metrics)` is one device call;
    `plan(step, k) -> (offset, step, length, batch)` says which call starts at `step` when a call
    may take `k` steps; `on_metrics(metrics, step, length)` gets each call's metrics on the host,
    in order. When `stop.is_set()`, no new call is sent once one is in flight; the step reached
    is then below `steps` unless the epoch was done anyway. The state returned is always the
    state after every step up to the step reached."""
    sent, step, inflight = start, start, collections.deque()
    while step < steps:
        while sent < steps and len(inflight) <= pace.ahead and not (stop.is_set() and inflight):
            offset, first, length, batch = plan(sent, pace.steps)
            began = time.monotonic()  # before the call: a python-loop call returns when done
            state, metrics = call(state, offset, first, length, batch)
            inflight.append((metrics, first, length, began))
            sent = first + length
        metrics, first, length, t = inflight.popleft()
        metrics = jax.device_get(metrics)
        pace.update(length, time.monotonic() - t)
        on_metrics(metrics, first, length)
        step = first + length
        if stop.is_set() and not inflight:
            break
    return state, step
