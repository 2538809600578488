"""Everything about a run's checkpoints, in one place:

    manager.py   orbax: asynchronous saves, the best by val_acc plus the two latest, reads that
                 fall back past a damaged checkpoint (and set it aside), a full disk as one line
    progress.py  the JSON record saved beside the arrays: where the run stands (Progress)
    layout.py    the state template a checkpoint is restored into, and the shape of every array
                 it holds (run.json's `state_tree`, checked before a checkpoint is touched)
    reading.py   a saved run's state from its workdir alone (`resnet_jax.restore`)
    workarounds.py  orbax's save thread, a pre-read of every array, quiet loggers: each with its reason
    run_files.py the run's own files beside them: run.json (what ran, changes, the test result),
                 metrics.jsonl, holdout.json, the workdir's lock, and the checks on resume

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a kill at
any moment leaves every finished checkpoint readable; nothing here deletes one except orbax's
preservation policy (the best and the two latest are kept).
"""

import importlib

# Names load on first use (run_files needs no orbax; a workdir's checks run before it loads).
_NAMES = {
    "check_tree": "layout",
    "state_tree": "layout",
    "template": "layout",
    "FOLDER": "manager",
    "Checkpoints": "manager",
    "exists": "manager",
    "last_complete_line": "manager",
    "quiet": "workarounds",
    "resumable_on_full_disk": "manager",
    "Progress": "progress",
    "open_run": "reading",
    "restore": "reading",
    "restore_with_meta": "reading",
}
__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    elif name in ("layout", "manager", "progress", "reading", "run_files", "workarounds"):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
