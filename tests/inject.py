"""train.py with a fault of the machine injected at one place (test_faults.py):

    python inject.py SITE [train.py flags...]

SITE is where the disk is full (`disk:lock`, `disk:run.json`, `disk:holdout.json`,
`disk:metrics.jsonl`, `disk:curves.png`, `disk:tensorboard`, `disk:checkpoint`,
`disk:checkpoint_async`; AFTER=N lets the first N such writes succeed), or where memory runs out
(`oom:run`, `oom:compile`, `oom:data`). The operating system's own error is raised from the
patched call (OSError ENOSPC, XLA's RESOURCE_EXHAUSTED), as the real fault would raise it.
"""

import builtins
import errno
import os
import sys

SITE = sys.argv[1]
AFTER = int(os.environ.get("AFTER", "0"))
calls = {"n": 0}


def due() -> bool:
    calls["n"] += 1
    return calls["n"] > AFTER


def no_space(path=""):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


kind, where = SITE.split(":")
if kind == "disk" and where == "lock":
    real_open = os.open

    def os_open(path, *args, **kwargs):
        if str(path).endswith(".lock") and due():
            raise no_space(path)
        return real_open(path, *args, **kwargs)

    os.open = os_open
elif kind == "disk" and where in ("run.json", "holdout.json", "curves.png", "metrics.jsonl"):
    real_replace, real_open = os.replace, builtins.open

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(where) and due():
            raise no_space(dst)
        return real_replace(src, dst, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if str(file).endswith(where) and "a" in mode and due():
            raise no_space(file)
        return real_open(file, mode, *args, **kwargs)

    os.replace, builtins.open = replace, open_
elif kind == "disk" and where == "tensorboard":
    from tensorboardX import event_file_writer

    real_write = event_file_writer.EventsWriter.write_event

    def write_event(self, event):
        if due():
            raise no_space("events.out.tfevents")
        return real_write(self, event)

    event_file_writer.EventsWriter.write_event = write_event
elif kind == "disk" and where in ("checkpoint", "checkpoint_async"):
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save
    real_wait = ocp.CheckpointManager.wait_until_finished

    def save(self, step, *args, **kwargs):
        if where == "checkpoint" and due():
            raise no_space(f"{step}.orbax-checkpoint-tmp")
        result = real_save(self, step, *args, **kwargs)
        if where == "checkpoint_async" and due():
            self._injected_failure = True
        return result

    def wait(self):
        real_wait(self)
        if getattr(self, "_injected_failure", False):
            raise ValueError(f"Error writing state: {no_space()}")  # as tensorstore words it

    ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished = save, wait
elif kind == "oom":
    import jax

    from resnet_jax import faults, pipeline

    exhausted = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes."
    )
    if where == "run":
        real_call = pipeline.TrainChunk.__call__

        def call(self, *args, **kwargs):
            if due():
                raise exhausted
            return real_call(self, *args, **kwargs)

        pipeline.TrainChunk.__call__ = call
    elif where == "compile":

        def compile_(self, *args, **kwargs):
            raise exhausted

        pipeline.TrainChunk.compile = compile_
    elif where == "data":
        faults.host_memory = lambda: 1 << 20  # 1 MiB free: the dataset cannot fit
else:
    raise SystemExit(f"unknown site {SITE}")

from resnet_jax.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
