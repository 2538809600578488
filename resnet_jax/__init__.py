"""resnet_jax: the seed Keras ResNet v1 on CIFAR-10, reproduced in JAX/Flax.

Notebook API: Config, preset, load_dataset / Dataset, ResNet, augment, create_train_state,
train_step, eval_step, predict; train_and_evaluate (with your own model, optimizer, augment,
callbacks); sweep (settings x seeds) and train_many (seeds); restore, evaluate,
evaluate_checkpoint; configure; the errors UserError, MachineFault and Interrupted. Names load
on first use: `import resnet_jax` imports JAX but starts no backend, loads no Flax, optax or
orbax and changes no process-wide setting, so the command line can make its platform decisions
(resnet_jax.tuning.setup) first.
"""

import importlib
import importlib.metadata

try:
    __version__ = importlib.metadata.version("resnet_jax")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

from resnet_jax.augment import augment  # eager: a function named like its module (imports jax)

_NAMES = {
    "Config": "config",
    "preset": "config",
    "tiny": "config",
    "Dataset": "dataset",
    "load_dataset": "data",
    "UserError": "errors",
    "Interrupted": "errors",
    "MachineFault": "faults",
    "ResNet": "models",
    "lr_for_epoch": "optim",
    "make_optimizer": "optim",
    "scale_by_keras_adam": "optim",
    "schedule": "optim",
    "TrainState": "steps",
    "eval_step": "steps",
    "l2_penalty": "steps",
    "predict": "steps",
    "train_step": "steps",
    "create_train_state": "parts",
    "evaluate": "evaluation",
    "evaluate_checkpoint": "evaluation",
    "restore": "checkpoint",
    "train_and_evaluate": "loop",
    "sweep": "sweeps",
    "train_many": "sweeps",
    "configure": "tuning",
}
_MODULES = {
    "atomic",
    "augment",
    "batches",
    "cache",
    "call_queue",
    "checkpoint",
    "cifar_archive",
    "cli",
    "config",
    "console",
    "data",
    "dataset",
    "device_data",
    "distributed",
    "errors",
    "evaluation",
    "faults",
    "image_folder",
    "interrupt",
    "layers",
    "loop",
    "metrics",
    "models",
    "optim",
    "parallel",
    "parts",
    "plots",
    "programs",
    "run_files",
    "steps",
    "sweeps",
    "tfds_data",
    "tuning",
    "writer",
}
__all__ = sorted(_NAMES) + ["augment"]


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"resnet_jax.{_NAMES[name]}"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"resnet_jax.{name}")
    else:
        raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | _MODULES)
