"""Compile once in a process: a notebook's second run, evaluation or prediction of the
same model, optimizer, settings and shapes compiles nothing, with no call to remember."""

import contextlib
import dataclasses
import io

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import random_dataset

import resnet_jax as rj

pytestmark = pytest.mark.slow  # end-to-end: the whole file

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # every XLA compile, cached or not


@contextlib.contextmanager
def compiles():
    """The names of the programs compiled inside (from JAX's own monitoring events)."""
    names = []

    def listen(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_a_second_run_evaluation_and_prediction_compile_nothing(tmp_path):
    ds = random_dataset(n_train=40, n_test=16, shape=(12, 12, 3))
    config = rj.presets.tiny(batch_size=8, epochs=1, num_filters=6)  # shapes no other test uses
    with compiles() as first:
        _, history_a = rj.train_and_evaluate(config, str(tmp_path / "a"), ds, verbosity=0)
    assert any("train_chunk" in n for n in first) and any("evaluate" in n for n in first), first
    with compiles() as second:
        _, history_b = rj.train_and_evaluate(config, str(tmp_path / "b"), ds, verbosity=0)
    assert second == [], second  # another workdir, the same shapes: nothing compiled again
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(history_a) == strip(history_b)  # and the same numbers

    rj.evaluate_checkpoint(str(tmp_path / "a"), "latest", dataset=ds)
    state = rj.restore(str(tmp_path / "a"), "latest")
    rj.predict(state, ds.test_images[:4])
    with compiles() as again:
        loss, acc = rj.evaluate_checkpoint(str(tmp_path / "b"), "latest", dataset=ds)
        probs = rj.predict(rj.restore(str(tmp_path / "b"), "latest"), ds.test_images[:4])
    assert again == [], again
    assert acc == history_b[-1]["val_acc"] and probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_runs_that_differ_in_their_optimizer_share_the_evaluation_and_the_initialisation(tmp_path):
    """The evaluation never reads the optimizer, and the library's optimizers share one init: a
    run at another learning rate compiles its own train step (optax bakes the rate into it) but
    neither the evaluation nor the initialisation, and evaluates as an evaluation compiled for it
    alone does."""
    ds = random_dataset(n_train=40, n_test=16, shape=(10, 10, 3))
    config = rj.presets.tiny(batch_size=8, epochs=1, num_filters=5)  # shapes no other test uses
    with compiles() as first:
        rj.train_and_evaluate(config, str(tmp_path / "a"), ds, verbosity=0)
    assert any("evaluate" in n for n in first), first
    other = dataclasses.replace(config, learning_rate=3e-3)
    with compiles() as second:
        state, history = rj.train_and_evaluate(other, str(tmp_path / "b"), ds, verbosity=0)
    assert any("train_chunk" in n for n in second), second
    assert not any("evaluate" in n or n == "jit(init)" for n in second), second  # nor the initialisation
    assert "jit(init)" in first, first
    from resnet_jax.device import programs

    programs.forget()  # an evaluation compiled afresh for this run: the same numbers
    assert rj.evaluate(state, ds)[1] == history[-1]["val_acc"]


class BatchNormCNN(nn.Module):
    """A convolution, BatchNorm (statistics in the state) and a dense head: seconds less to compile."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_a_new_run_compiled_while_its_state_initialises_trains_the_same(tmp_path, monkeypatch):
    """tuning.Platform.compile_early (on GPUs and TPUs, with their scan loop): a new run's programs
    compile on a thread from the state's shapes (device_data.abstract) while the state is
    initialised. They run the real arrays, one compile per call shape, and the run is the same
    bit for bit as one compiled after its state (the CPU's way); a resumed run compiles after its
    state."""
    from conftest import assert_same_run

    from resnet_jax import process
    from resnet_jax.device import programs

    ds = random_dataset(n_train=44, n_test=12, shape=(8, 8, 3))  # calls of 2, 2, 1 steps, partial 4
    config = rj.presets.tiny(batch_size=8, eval_batch_size=12, epochs=1, device_loop="scan", steps_per_call=2)
    model = BatchNormCNN()  # a ResNet's compiles take seconds each on this CPU
    current = process.current
    early = lambda: dataclasses.replace(current(), compile_early=True)
    monkeypatch.setattr(process, "current", early)
    printed = io.StringIO()
    with compiles() as names, contextlib.redirect_stdout(printed):
        rj.train_and_evaluate(config, str(tmp_path / "early"), ds, model=model, verbosity=1)
    assert "begun with the state" in printed.getvalue()
    assert sum("train_chunk" in n for n in names) == 3, names  # (2, 8), (1, 8), (1, 4): once each

    # The same run compiled after its state, this process's compiled programs forgotten.
    monkeypatch.setattr(process, "current", current)
    programs.forget()
    rj.train_and_evaluate(config, str(tmp_path / "after"), ds, model=model, verbosity=0)
    assert_same_run(str(tmp_path / "early"), str(tmp_path / "after"), model=model)

    # Resumed for one epoch more: compiled after its state (it may start mid-epoch).
    monkeypatch.setattr(process, "current", early)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rj.train_and_evaluate(dataclasses.replace(config, epochs=2), str(tmp_path / "early"), ds, model=model)
    assert "begun with the state" not in printed.getvalue() and "Compiled in" in printed.getvalue()
