"""A real Jupyter kernel for the tests, driven as a notebook drives one: ipykernel started by
jupyter_client's KernelManager, code sent on its shell channel, everything the notebook would
show read from its iopub messages (with the time each arrived)."""

import os
import queue
import time

from jupyter_client import KernelManager


class Kernel:
    def __init__(self, env=None, cwd=None):
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=dict(env or os.environ), cwd=cwd)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 300, on_message=None):
        """Execute `code`; returns [(seconds since sent, msg_type, content)] of its iopub messages
        until the kernel is idle again. `on_message(seconds, msg_type, content)` sees each as it
        arrives (to interrupt the kernel at a chosen moment)."""
        msg_id = self.client.execute(code)
        began, messages = time.monotonic(), []
        while True:
            left = timeout - (time.monotonic() - began)
            if left <= 0:
                raise TimeoutError(f"the kernel did not finish within {timeout} s: {messages[-5:]}")
            try:
                msg = self.client.get_iopub_msg(timeout=min(left, 5))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            seen = (time.monotonic() - began, kind, content)
            messages.append(seen)
            if on_message is not None:
                on_message(*seen)
            if kind == "status" and content["execution_state"] == "idle":
                return messages

    def interrupt(self):
        self.manager.interrupt_kernel()

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def text(messages, name=None) -> str:
    """What the notebook shows as stream output (stdout and stderr, or `name`'s only)."""
    return "".join(
        c["text"] for _, kind, c in messages if kind == "stream" and (name is None or c["name"] == name)
    )


def error(messages):
    """The error the notebook shows, as its lines (ename, evalue, traceback), or None."""
    for _, kind, c in messages:
        if kind == "error":
            return c
    return None
