"""A state's test loss and accuracy: `evaluate` (a state on a dataset's test split),
`evaluate_checkpoint` (a saved run's best or latest state on its own test set, or on yours;
train.py --eval_only), and `evaluate_on` (the summed metrics, over a given mesh)."""

from __future__ import annotations

import jax
import numpy as np

from resnet_jax import process
from resnet_jax.checkpoint import open_run, restore_with_meta
from resnet_jax.data import load
from resnet_jax.data.dataset import Dataset, check_fits_model
from resnet_jax.device import data as device_data
from resnet_jax.device import parallel, programs
from resnet_jax.device.metrics import Sums
from resnet_jax.errors import UserError


def evaluate_on(state, dataset: Dataset, config, mesh) -> Sums:
    """Summed metrics of a state on a dataset's test split, over every device of `mesh`."""
    state = parallel.replicate(jax.device_get(state), mesh)
    data = device_data.for_evaluation(dataset, np.asarray(state.pixel_mean), config, mesh)
    program = programs.evaluate_program(config, mesh, programs.make_evaluate(config, mesh), state, data)
    with process.compiling():  # a cache entry it cannot read: one warning line
        (evaluate,) = programs.compile_all([program], threads=1)  # once per shape in this process
    return Sums().add(jax.device_get(programs.Evaluation(evaluate)(state, data)))


def evaluate(state, dataset: Dataset) -> tuple[float, float]:
    """(test loss, test accuracy) of a state (from train_and_evaluate or restore) on `dataset`'s
    test split, exact over every image, on every device. The loss includes the L2 term, as Keras
    reports it. Data of another image shape, number of classes or class names is refused."""
    check_fits_model(dataset, state.config, np.shape(state.pixel_mean))
    test = evaluate_on(state, dataset, state.config, _mesh(state, dataset))
    return test.mean_loss, test.accuracy


def _mesh(state, dataset: Dataset):
    """The devices the state's run would use (resnet_jax.tuning.run_devices): the same sums."""
    return parallel.run_mesh(process.current(), state.config, dataset.image_shape, state.model)


def evaluate_checkpoint(
    workdir: str,
    which: str = "best",
    dataset: Dataset | None = None,
    data_dir: str | None = None,
    console=None,
    *,
    model=None,
):
    """(test loss, test accuracy) of a saved state on the run's test set (or `dataset`'s, refused
    when its image shape, number of classes or class names are not the run's)."""
    path, config, info = open_run(workdir)
    if dataset is None:
        trained_on = (info.get("data") or {}).get("source", "")
        if trained_on == "arrays":
            raise UserError(
                f"the run in {path} trained on in-memory arrays, which the command line cannot "
                "load; evaluate it in Python: resnet_jax.evaluate_checkpoint(workdir, "
                "dataset=resnet_jax.Dataset(...))"
            )
        if data_dir is None and config.data_dir is None and trained_on.startswith("folder:"):
            data_dir = trained_on.split(":", 1)[1]
        dataset = load.for_config(config, data_dir)
    if tuple(dataset.image_shape) != tuple(info["image_shape"]):
        raise UserError(
            f"the run in {path} trained on images of shape {tuple(info['image_shape'])}, the data "
            f"given has {tuple(dataset.image_shape)}; evaluate it on data of the run's shape"
        )
    check_fits_model(dataset, config, info["image_shape"], f"the run in {path}")
    state, progress, step = restore_with_meta(path, which, model=model)
    if console is not None:
        if progress.step_in_epoch:  # "epoch 2, step 10/1563, mid-epoch (step 1573)"
            where = f"{progress.where(info.get('steps_per_epoch'))}, mid-epoch"
            where += f" (step {step})" if step != progress.step_in_epoch else ""
        else:
            where = f"{progress.where()} (step {step})"
        images = f"{len(dataset.test_images):,} test images"
        console.line(f"Evaluating the {which} checkpoint of {path}: {where}, on the {images}")
    test = evaluate_on(state, dataset, state.config, _mesh(state, dataset))
    return test.mean_loss, test.accuracy
