"""The device-call queue of an epoch (resnet_jax.call_queue), alone: fake device calls stand in for the
train step, so what is in flight, what is read, and what a stop request does can be watched."""

import threading

import numpy as np
import pytest

from resnet_jax.device import calls
from resnet_jax.device.batches import next_call


class Devices:
    """Fake device calls: the state is the number of steps done; each call records how many
    calls were in flight (sent, not yet read) when it was sent."""

    def __init__(self, bad_step=None):
        self.sent, self.read, self.in_flight_at_send, self.bad_step = [], [], [], bad_step

    def call(self, state, offset, step, length, batch):
        assert state == step  # calls run in order, each from the state the last one left
        self.in_flight_at_send.append(len(self.sent) - len(self.read))
        self.sent.append((step, length))
        loss = np.ones(length)
        if self.bad_step is not None and step <= self.bad_step < step + length:
            loss[self.bad_step - step] = np.nan
        return state + length, {"loss": loss, "count": np.ones(length)}

    def on_metrics(self, metrics, step, length):
        self.read.append((step, length))
        if not np.all(np.isfinite(metrics["loss"])):
            raise FloatingPointError(f"step {step}")


def plan(step, k):
    return next_call(100, 10, k, step)  # 100 images, batch 10: 10 steps an epoch


def test_the_scan_loop_keeps_one_call_queued_and_reads_every_call_in_order():
    d = Devices()
    pace = calls.Pace("scan", 3)
    state, step = calls.run(0, d.call, plan, 0, 10, pace, threading.Event(), d.on_metrics)
    assert (state, step) == (10, 10)
    assert d.sent == d.read == [(0, 3), (3, 3), (6, 3), (9, 1)]  # calls end at multiples of 3
    assert max(d.in_flight_at_send) == 1 and d.in_flight_at_send[1] == 1  # one queued ahead


def test_the_python_loop_queues_nothing_and_resumes_mid_epoch():
    d = Devices()
    pace = calls.Pace("python", 100)
    state, step = calls.run(4, d.call, plan, 4, 10, pace, threading.Event(), d.on_metrics)
    assert (state, step) == (10, 10) and d.sent[0] == (4, 1)
    assert set(d.in_flight_at_send) == {0}
    assert sum(length for _, length in d.read) == 6


@pytest.mark.parametrize("after", [1, 2, 3])
def test_a_stop_request_drains_the_calls_in_flight_and_ends_at_their_boundary(after):
    d = Devices()
    stop = threading.Event()

    def on_metrics(metrics, step, length):
        d.on_metrics(metrics, step, length)
        if len(d.read) == after:
            stop.set()

    state, step = calls.run(0, d.call, plan, 0, 10, calls.Pace("scan", 2), stop, on_metrics)
    assert d.read == d.sent  # every call sent was read: nothing is lost in flight
    assert state == step == sum(length for _, length in d.sent) < 10
    assert len(d.sent) == after + 1  # the one already queued when the stop came, no more


def test_a_metrics_error_stops_the_queue_where_it_happened():
    d = Devices(bad_step=5)
    with pytest.raises(FloatingPointError, match="step 4"):
        calls.run(0, d.call, plan, 0, 10, calls.Pace("scan", 2), threading.Event(), d.on_metrics)
    assert d.read[-1] == (4, 2) and len(d.sent) <= len(d.read) + 1


def test_the_python_loop_paces_calls_to_about_half_a_second():
    pace = calls.Pace("python", 100)
    assert pace.steps == 1
    pace.update(1, 0.01)  # 10 ms a step: 50 steps a call
    assert pace.steps == 50
    pace.update(50, 5.0)  # 100 ms a step: 5
    assert pace.steps == 5
    pace.update(5, 0.0001)
    assert pace.steps == 100  # capped by steps_per_call
    scan = calls.Pace("scan", 100)
    scan.update(100, 50.0)
    assert scan.steps == 100  # the scan loop keeps its aligned calls
