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
"""

from __future__ import annotations

import contextlib
import signal
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
            raise KeyboardInterrupt
        stop.set()
        say(
            f"{chr(10) if end_bar else ''}{signal.Signals(signum).name}: saving the latest state after this "
            "device call... (again to stop at once)"
        )

    request_stop.stop = stop
    before = {s: signal.signal(s, request_stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
