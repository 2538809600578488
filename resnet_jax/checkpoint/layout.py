"""What a checkpoint holds, without reading one: the state template to restore into, and the
path, shape and dtype of every array (run.json's `state_tree`), so that a resume or restore with
another model or optimizer is refused, naming the first array that differs, before any
checkpoint is touched."""

from __future__ import annotations

import jax

from resnet_jax.errors import UserError
from resnet_jax.model.memo import per_process
from resnet_jax.model.steps import TrainState, check_image_shape, initial_arrays


def template(model, tx, config, image_shape) -> TrainState:
    """The state's structure, shapes and dtypes without computing it (jax.eval_shape): what a
    checkpoint of this model and optimizer is restored into."""
    shapes = _shapes(model, tx.init, check_image_shape(image_shape))
    return TrainState(**shapes, apply_fn=model.apply, tx=tx, config=config)


@per_process(maxsize=16)
def _shapes(model, opt_init, image_shape: tuple) -> dict:
    """The initial state's arrays, abstract: traced once per model, optimizer's init and shape in
    a process."""
    return jax.eval_shape(
        initial_arrays(model, opt_init, image_shape), jax.eval_shape(lambda: jax.random.key(0))
    )


def state_tree(state) -> list:
    """[path, shape, dtype] of every array a checkpoint of `state` holds (run.json's record)."""
    return [
        [jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    ]


def check_tree(info: dict, tree: list, workdir: str, only=None):
    """Refuse a state whose arrays differ from the saved run's (run.json `info`), naming the first
    that differs (`only`: the top-level fields to compare, e.g. params and batch_stats)."""
    saved = info.get("state_tree")
    if saved is None:  # written by an earlier version: the config check stands alone
        return
    keep = (
        (lambda rows: rows)
        if only is None
        else (lambda rows: [r for r in rows if any(r[0].startswith(f".{f}") for f in only)])
    )
    a, b = {r[0]: r for r in keep(saved)}, {r[0]: r for r in keep(tree)}
    for path in [r[0] for r in keep(saved)] + [r[0] for r in keep(tree)]:
        if a.get(path) == b.get(path):
            continue
        what = "model" if path.startswith((".params", ".batch_stats")) else "optimizer"
        there = f"{tuple(a[path][1])} {a[path][2]}" if path in a else "absent"
        here = f"{tuple(b[path][1])} {b[path][2]}" if path in b else "absent"
        raise UserError(
            f"workdir {workdir} holds a run of another {what}: {path.lstrip('.')} is {there} there, "
            f"{here} here; pass the run's {what} to resume or restore it, or another --workdir "
            "(nothing was deleted)"
        )
