"""A saved run's state from its workdir alone: `restore` (the notebook's call), and
`restore_with_meta` (also where the run stood: its Progress and step)."""

from __future__ import annotations

import os

import jax

from resnet_jax import process
from resnet_jax.checkpoint import run_files
from resnet_jax.checkpoint.layout import check_tree, state_tree, template
from resnet_jax.checkpoint.manager import FOLDER, Checkpoints
from resnet_jax.checkpoint.progress import Progress
from resnet_jax.errors import UserError
from resnet_jax.model import parts, steps


def open_run(workdir: str):
    """(path, config, run.json info) of a saved run; clear errors when there is none."""
    path = os.path.abspath(os.path.expanduser(workdir))
    saved = run_files.read_run(path) if os.path.isdir(path) else None
    if saved is None and run_files.is_sweep(path):
        runs = sorted(
            os.path.relpath(root, path) for root, _, files in os.walk(path) if run_files.RUN_FILE in files
        )
        some = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "") if runs else "none finished yet"
        raise UserError(
            f"{path} holds a sweep ({run_files.SWEEP_FILE}), not one run; name one of its runs, e.g. "
            f"--workdir {os.path.join(path, runs[0] if runs else 'seed_0')} (its runs: {some})"
        )
    if saved is None:
        raise UserError(f"{path} holds no resnet_jax run (no {run_files.RUN_FILE}); train one first")
    if not os.path.isdir(os.path.join(path, FOLDER)):
        raise UserError(f"{path} has no checkpoint yet; train at least one epoch first")
    return path, saved[0], saved[1]


def restore_with_meta(workdir: str, which: str = "best", *, model=None, optimizer=None, platform=None):
    """(state, progress, step) of a saved checkpoint (`best` by val_acc, or `latest`).

    A run of your own model needs `model=`. A run of your own optimizer restores its state as
    saved (plain arrays, no `tx`) unless you pass the `optimizer=` again. `platform`: the
    caller's decision (resnet_jax.tuning), else made here."""
    path, config, info = open_run(workdir)
    if which not in ("best", "latest"):
        raise UserError(f"which must be 'best' or 'latest', got {which!r}")
    record = info.get("parts") or {}
    if record.get("model", {}).get("own") and model is None:
        name = record["model"].get("class", "your model")
        raise UserError(
            f"the run in {path} trained your own model ({name}); pass it: "
            f"resnet_jax.restore(workdir, model={name}(...))"
        )
    image_shape, steps_per_epoch = tuple(info["image_shape"]), info["steps_per_epoch"]
    if platform is None:
        process.setup()
        platform = process.current()
    chosen = parts.resolve(config, image_shape, steps_per_epoch, platform, model=model, optimizer=optimizer)
    like = template(chosen.model, chosen.tx, config, image_shape)
    as_saved = record.get("optimizer", {}).get("own") and optimizer is None
    check_tree(info, state_tree(like), path, only=("params", "batch_stats") if as_saved else None)
    with Checkpoints(path, read_only=True) as ckpts:
        try:
            restored = ckpts.restore(None if as_saved else like, which)
        except UserError as e:
            raise UserError(f"{e}{_readable_alternative(ckpts, which)}") from None
        saved = ckpts.steps()
    if restored is None:
        if which == "best" and saved:  # a stop mid-epoch 1 saved a latest one
            raise UserError(
                f"{path} has no best checkpoint yet (no epoch has finished); its latest checkpoint "
                f"(mid-epoch) is there: pass which='latest' (--which latest) to use it"
            )
        raise UserError(f"{path} has no {which} checkpoint yet; train at least one epoch first")
    state = restored[0]
    if as_saved:  # the fields that hold no array (a model without batch norm) are the template's
        empty = {
            k: getattr(like, k) for k in ("params", "batch_stats") if not jax.tree.leaves(getattr(like, k))
        }
        state = steps.TrainState(**{**empty, **state}, apply_fn=chosen.model.apply, tx=None, config=config)
    return state, Progress.from_meta(restored[1]), restored[2]


def _readable_alternative(ckpts, which) -> str:
    """What else is readable when the chosen checkpoint is not, and the flag that picks it."""
    if which == "best":
        for step in ckpts.steps()[::-1]:
            meta = ckpts.read_meta(step)
            if meta is not None:
                where = Progress.from_meta(meta).where()
                return f"; the latest checkpoint ({where}, step {step}) is readable: pass --which latest"
    return ""


def restore(workdir: str, which: str = "best", *, model=None, optimizer=None) -> steps.TrainState:
    """The saved state of a run (`best` by val_acc, or `latest`), from the workdir alone; a run
    of your own model needs `model=` (and, to go on training it, your `optimizer=`)."""
    return restore_with_meta(workdir, which, model=model, optimizer=optimizer)[0]
