"""A fault of the machine injected at one place (test_faults.py): `install(site, setattr)` patches
what the real fault would make fail, through `setattr` (pytest's monkeypatch.setattr, so it is
undone after the test; the plain builtin when run as a script):

    python inject.py SITE [train.py flags...]      # train.py in a process of its own

SITE is where the disk is full (`disk:lock`, `disk:run.json`, `disk:holdout.json`,
`disk:metrics.jsonl`, `disk:curves.png`, `disk:tensorboard`, `disk:checkpoint`,
`disk:checkpoint_async`; `after` lets the first N such writes succeed), or where memory runs out
(`oom:run`, `oom:compile`, `oom:data`). The operating system's own error is raised from the
patched call (OSError ENOSPC, XLA's RESOURCE_EXHAUSTED), as the real fault would raise it.
"""

import builtins
import errno
import os
import sys


def no_space(path=""):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def install(site: str, setattr=setattr, after: int = 0):
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] > after

    kind, where = site.split(":")
    if kind == "disk" and where == "lock":
        real_open = os.open

        def os_open(path, *args, **kwargs):
            if str(path).endswith(".lock") and due():
                raise no_space(path)
            return real_open(path, *args, **kwargs)

        setattr(os, "open", os_open)
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

        setattr(os, "replace", replace)
        setattr(builtins, "open", open_)
    elif kind == "disk" and where == "tensorboard":
        from tensorboardX import event_file_writer

        real_write = event_file_writer.EventsWriter.write_event

        def write_event(self, event):
            if due():
                raise no_space("events.out.tfevents")
            return real_write(self, event)

        setattr(event_file_writer.EventsWriter, "write_event", write_event)
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

        setattr(ocp.CheckpointManager, "save", save)
        setattr(ocp.CheckpointManager, "wait_until_finished", wait)
    elif kind == "oom":
        import jax

        from resnet_jax import errors
        from resnet_jax.device import programs

        exhausted = jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes."
        )
        if where == "run":
            real_call = programs.TrainCall.__call__

            def call(self, *args, **kwargs):
                if due():
                    raise exhausted
                return real_call(self, *args, **kwargs)

            setattr(programs.TrainCall, "__call__", call)
        elif where == "compile":

            def compile_(self, *args, **kwargs):
                raise exhausted

            setattr(programs.TrainCall, "compile", compile_)
        elif where == "data":
            setattr(errors, "host_memory", lambda: 1 << 20)  # 1 MiB free: the dataset cannot fit
    else:
        raise ValueError(f"unknown site {site}")


if __name__ == "__main__":
    install(sys.argv[1], after=int(os.environ.get("AFTER", "0")))
    from resnet_jax.cli import main

    sys.exit(main(sys.argv[2:]))
