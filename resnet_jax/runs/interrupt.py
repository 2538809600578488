"""Ctrl-C (and, for the command line, SIGTERM) as a request to stop with the state saved.

While a run trains, the first signal sets the run's `stop` event: the loop saves after the
current device call and raises `Interrupted`, and calling (or running) the same again resumes.
A second signal raises KeyboardInterrupt at once; every checkpoint already written stays
intact (orbax renames a checkpoint's folder only once it is complete).

Jupyter and IPython interrupt a kernel with SIGINT, so a notebook gets what train.py gets. The
handlers the process had before are put back when the call returns or raises. Python lets only
the main thread set signal handlers: a run started on another thread installs none, and Ctrl-C
there raises KeyboardInterrupt in the main thread as usual (the run's checkpoints stay intact,
the epoch in progress is lost).

A signal handler's exception is raised wherever the main thread happens to be, and Python drops
one raised inside a garbage-collection callback or a `__del__` (JAX registers a gc callback), with
an "Exception ignored in ..." traceback on stderr. While the handlers are in place, such a dropped
KeyboardInterrupt of a second request is not printed but delivered again (`_thread.interrupt_main`,
from a timer) once the main thread is back where it can be raised.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading

from resnet_jax.errors import Interrupted, say

__all__ = ["Interrupted", "saving_on"]


@contextlib.contextmanager
def saving_on(stop: threading.Event, signals=(signal.SIGINT,), end_bar: bool = False):
    """Inside, `signals` set `stop` (the second raises KeyboardInterrupt); the handlers before
    are restored on leaving. Nested uses for the same `stop` leave the outer handlers in place.
    `end_bar`: a progress bar is on the terminal, end its line before the notice."""
    main = threading.current_thread() is threading.main_thread()
    if not main or all(getattr(signal.getsignal(s), "stop", None) is stop for s in signals):
        yield
        return

    def request_stop(signum, frame):
        if stop.is_set():  # a second request: give up at once (checkpoints stay intact)
            given_up.append(signum)
            raise KeyboardInterrupt
        stop.set()
        say(
            f"{chr(10) if end_bar else ''}{signal.Signals(signum).name}: saving the latest state after this "
            "device call... (again to stop at once)"
        )

    def deliver_again(unraisable, hook=sys.unraisablehook):
        if given_up and isinstance(unraisable.exc_value, KeyboardInterrupt):
            # raised again by the handler once the main thread is out of here (a signal that
            # arrived now would be handled, and dropped, inside this hook)
            threading.Timer(0.05, _thread.interrupt_main, (given_up[-1],)).start()
        else:
            hook(unraisable)

    given_up = []
    request_stop.stop = stop
    before = {s: signal.signal(s, request_stop) for s in signals}
    hook_before, sys.unraisablehook = sys.unraisablehook, deliver_again
    try:
        yield
    finally:
        sys.unraisablehook = hook_before
        for s, handler in before.items():
            signal.signal(s, handler)
