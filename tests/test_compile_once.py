"""Compile once in a process (issue 32): a notebook's second run, evaluation or prediction of the
same model, optimizer, settings and shapes compiles nothing, with no call to remember."""

import contextlib

import jax
import numpy as np
from conftest import random_dataset

import resnet_jax as rj

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
    config = rj.tiny(batch_size=8, epochs=1, num_filters=6)  # shapes no other test uses
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
