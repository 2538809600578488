"""The notebook door, tested in a real Jupyter kernel (ipykernel, driven by jupyter_client as a
notebook drives it): a live progress display during an epoch, Ctrl-C (the kernel's interrupt)
saving and resuming, and the Python API's mistakes shown in one line."""

import os
import re

import pytest
from cifar_files import write_cifar
from conftest import ENV
from kernel import Kernel, error, text

pytestmark = pytest.mark.slow

SETUP = """
import signal, resnet_jax as rj
handler = signal.getsignal(signal.SIGINT)
data = rj.load_dataset(data_dir={archive!r}, verbose=False)
config = rj.preset("tiny", batch_size=16, epochs={epochs})
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel")
    archive, _ = write_cifar(root / "data", rows=(400, 400, 400, 400, 400), test_rows=100)
    k = Kernel(env=dict(ENV, PYTHONUNBUFFERED="1"), cwd=str(root))
    k.run(SETUP.format(archive=archive, epochs=2))
    yield k, root
    k.close()


def progress_updates(messages):
    """(seconds, the line last drawn) of the stream messages that redraw the progress line in
    place (a carriage return, then step, loss, accuracy, speed and time left)."""
    return [
        (t, c["text"].split("\r")[-1])
        for t, kind, c in messages
        if kind == "stream" and "\r" in c["text"] and "img/s" in c["text"].split("\r")[-1]
    ]


def test_an_epoch_shows_a_live_progress_line_in_a_kernel(kernel):
    k, root = kernel
    messages = k.run(f"state, history = rj.train_and_evaluate(config, {str(root / 'live')!r}, data)")
    assert error(messages) is None, error(messages)
    shown = text(messages)
    assert "Compiling the train step" in shown.split("Epoch 1/2")[0]  # said before the compile
    updates = progress_updates(messages)
    assert len(updates) >= 4, shown
    last = updates[-1][1]
    for field in ("/125", "loss:", "acc:", "img/s", "ETA:"):
        assert field in last, last
    # Updated at least every few seconds while an epoch runs (each device call, ~0.5 s apart).
    starts = [t for t, kind, c in messages if kind == "stream" and "Epoch 1/2" in c.get("text", "")]
    ends = [t for t, kind, c in messages if kind == "stream" and "val_acc:" in c.get("text", "")]
    during = [starts[0]] + [t for t, _ in updates if starts[0] <= t <= ends[0]] + [ends[0]]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) < 5, gaps


def test_an_interrupt_saves_raises_one_line_and_the_same_call_resumes(kernel):
    k, root = kernel
    call = f"state, history = rj.train_and_evaluate(config, {str(root / 'stopped')!r}, data)"
    asked = []

    def interrupt_mid_epoch(seconds, kind, content):
        if not asked and kind == "stream" and "img/s" in content["text"]:
            asked.append(seconds)
            k.interrupt()

    messages = k.run(call, on_message=interrupt_mid_epoch)
    assert asked, text(messages)
    shown = error(messages)
    assert shown is not None and shown["ename"] == "Interrupted", shown
    assert len(shown["traceback"]) == 1 and re.match(
        r"Interrupted: stopped at epoch 1, step \d+/125", shown["traceback"][0]
    )
    assert "WARNING" not in text(messages, "stderr"), text(messages, "stderr")
    again = k.run(call)
    assert error(again) is None and "Resuming" in text(again) and "Test accuracy" in text(again), text(again)
    same = k.run("print(signal.getsignal(signal.SIGINT) is handler)")
    assert text(same).strip() == "True"  # the kernel's own handler again


@pytest.mark.parametrize(
    "call, words",
    [
        ("rj.Config(learnign_rate=0.01)", ["learnign_rate", "did you mean learning_rate"]),
        ('rj.preset("tiny", epochz=3)', ["epochz", "did you mean epochs"]),
        ('rj.Config(learning_rate="fast")', ["learning_rate takes a float", "'fast'"]),
        (
            'rj.sweep(config, "sw", grid={"learnign_rate": [1e-3]}, dataset=data)',
            ["did you mean learning_rate"],
        ),
    ],
)
def test_the_python_apis_mistakes_show_in_one_line(kernel, call, words):
    k, root = kernel
    shown = error(k.run(call))
    assert shown is not None and shown["ename"] == "UserError", shown
    assert len(shown["traceback"]) == 1, shown["traceback"]
    for word in words:
        assert word in shown["traceback"][0], shown["traceback"]
    assert not os.path.exists(os.path.join(root, "sw"))  # nothing written


def test_a_sweep_with_workers_shows_in_the_notebook_and_an_interrupt_stops_them_all(kernel):
    k, root = kernel
    call = (
        f"summary = rj.sweep(rj.preset('tiny', batch_size=16, epochs=40), {str(root / 'sw')!r}, "
        "grid={'learning_rate': [1e-3, 3e-3]}, dataset=data, workers=2)"
    )
    asked = []

    def interrupt_once_both_train(seconds, kind, content):
        shown = content.get("text", "") if kind == "stream" else ""
        if shown.count("[worker") and not asked:
            asked.append(shown)
        elif shown.count("[worker") and len(asked) == 1:  # the second worker's run started too
            asked.append(shown)
            k.interrupt()

    messages = k.run(call, on_message=interrupt_once_both_train)
    shown = text(messages)
    assert "2 at once (workers" in shown and shown.count("[worker") >= 2, shown
    assert error(messages) is not None and error(messages)["ename"] == "Interrupted", error(messages)
    assert len(error(messages)["traceback"]) == 1
    pgrep = (
        f"subprocess.run(['pgrep', '-f', 'resnet_jax --workdir {root / 'sw'}'], capture_output=True).stdout"
    )
    alive = k.run(f"import subprocess; print({pgrep})")
    assert "b''" in text(alive)  # no worker left running
