"""Everything about a run's checkpoints, in one place:

    manager.py   orbax: asynchronous saves, the best by val_acc plus the two latest, reads that
                 fall back past a damaged checkpoint (and set it aside), a full disk as one line
    progress.py  the JSON record saved beside the arrays: where the run stands (Progress)
    layout.py    the state template a checkpoint is restored into, and the shape of every array
                 it holds (run.json's `state_tree`, checked before a checkpoint is touched)
    reading.py   a saved run's state from its workdir alone (`resnet_jax.restore`)

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a kill at
any moment leaves every finished checkpoint readable; nothing here deletes one except orbax's
preservation policy (the best and the two latest are kept).
"""

from resnet_jax.checkpoint.layout import check_tree, state_tree, template
from resnet_jax.checkpoint.manager import (
    FOLDER,
    Checkpoints,
    exists,
    last_complete_line,
    quiet,
    resumable_on_full_disk,
)
from resnet_jax.checkpoint.progress import Progress
from resnet_jax.checkpoint.reading import open_run, restore, restore_with_meta

__all__ = [
    "FOLDER",
    "Checkpoints",
    "Progress",
    "check_tree",
    "exists",
    "last_complete_line",
    "open_run",
    "quiet",
    "restore",
    "restore_with_meta",
    "resumable_on_full_disk",
    "state_tree",
    "template",
]
