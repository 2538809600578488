"""A notebook's Ctrl-C (a real SIGINT to a process running train_and_evaluate): the state is
saved after the current device call, the call raises rj.Interrupted in one line, a second
SIGINT stops at once, the process's handler is back after each call, and calling again ends
bit-identical to a run that was never interrupted."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ENV, ROOT, Lines, assert_same_run, metrics, wait_for

import resnet_jax as rj
from resnet_jax.runs import interrupt


@pytest.mark.slow  # end-to-end
def test_sigint_saves_raises_interrupted_and_calling_again_resumes_exactly(full_run, archive, tmp_path):
    _, reference = full_run
    workdir = str(tmp_path / "w")
    script = os.path.join(ROOT, "tests", "notebook_run.py")
    errors = open(tmp_path / "stderr", "w+")  # stdout is read line by line, stderr kept apart
    proc = subprocess.Popen(
        [sys.executable, script, workdir, archive],
        cwd=os.path.join(ROOT, "tests"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    out = Lines(proc)
    # The first call, once its first epoch is written: one SIGINT.
    assert wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and metrics(workdir))
    proc.send_signal(signal.SIGINT)
    assert wait_for(lambda: out.seen("CALL 2"))
    # The second call, once it is in its last epoch: two SIGINTs, the second stops at once.
    assert wait_for(lambda: out.seen("Epoch 3/3"))
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    out.thread.join()
    errors.seek(0)
    err = errors.read()
    lines = out.lines
    assert proc.returncode == 0, err
    first = lines[lines.index("CALL 1\n") + 1 : lines.index("CALL 2\n")]
    interrupted = [line for line in first if line.startswith("Interrupted")]
    assert len(interrupted) == 1, first
    assert re.fullmatch(
        r"Interrupted: stopped (at epoch 2, step \d/6|after epoch \d); the state is saved in "
        + re.escape(os.path.join(workdir, "checkpoints"))
        + r": call it again to resume\n",
        interrupted[0],
    )
    assert lines.count("handler restored: True\n") == len([x for x in lines if x.startswith("CALL")])
    assert "FINISHED\n" in lines and "Traceback" not in err, err
    assert err.count("SIGINT: saving the latest state after this device call") >= 2, err
    assert_same_run(workdir, reference)  # 3 epochs, bit for bit with the uninterrupted run


def test_off_the_main_thread_no_handler_is_set():
    import threading

    seen = []
    stop = threading.Event()

    def in_thread():
        with interrupt.saving_on(stop):
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [before]
    with interrupt.saving_on(stop):
        assert getattr(signal.getsignal(signal.SIGINT), "stop", None) is stop
        with interrupt.saving_on(stop):  # nested (train_many's runs): the outer handler stays
            assert signal.getsignal(signal.SIGINT).stop is stop
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_request_dropped_by_python_is_delivered_again_and_not_printed(capfd):
    """A handler's KeyboardInterrupt raised inside a gc callback (JAX has one) is dropped by
    Python with an "Exception ignored in" traceback: the second request must still stop the
    call, and print nothing of the kind."""
    import gc

    stop = threading.Event()

    def collecting(phase, info):  # the second request, arriving while gc runs its callbacks
        if phase == "start" and stop.is_set():
            gc.callbacks.remove(collecting)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

    before = signal.getsignal(signal.SIGINT)
    hook = sys.unraisablehook
    try:
        with pytest.raises(KeyboardInterrupt), interrupt.saving_on(stop):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the first: stop after the call
            assert stop.is_set()
            gc.callbacks.append(collecting)
            gc.collect()  # the KeyboardInterrupt is dropped here...
            for _ in range(100):  # ...and raised again at the next point that can raise it
                time.sleep(0.01)
    finally:
        if collecting in gc.callbacks:
            gc.callbacks.remove(collecting)
    assert signal.getsignal(signal.SIGINT) is before and sys.unraisablehook is hook
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err
    assert "SIGINT: saving the latest state" in err


def test_interrupted_is_exported_and_shows_one_line_in_ipython():
    e = rj.Interrupted("after epoch 2", "/w/checkpoints")
    assert isinstance(e, rj.errors.Interrupted)
    assert e._render_traceback_() == [f"Interrupted: {e}"] and "\n" not in str(e)
    with pytest.raises(rj.Interrupted):
        raise e
