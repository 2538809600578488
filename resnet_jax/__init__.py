"""resnet_jax: the seed Keras ResNet v1 on CIFAR-10, reproduced in JAX/Flax.

What a notebook uses is here: Config, preset, load_dataset, Dataset, ResNet, TrainState,
create_train_state, train_step, eval_step, predict; train_and_evaluate (with your own model,
optimizer, augmentation, callbacks), sweep (settings x seeds) and train_many (seeds); restore,
evaluate, evaluate_checkpoint; configure; the errors UserError, MachineFault and Interrupted.
Everything else lives in its room (docs/layout.md): `data`, `model`, `device`, `checkpoint`,
`runs`, and the top-level modules `cli`, `flags`, `config`, `presets`, `errors`, `tuning`,
`process`, `atomic`.

Names load on first use: `import resnet_jax` starts no JAX backend, loads no Flax, optax or
orbax and changes no process-wide setting, so the command line can make its platform decisions
(resnet_jax.process.setup) first.
"""

import importlib
import importlib.metadata

try:
    __version__ = importlib.metadata.version("resnet_jax")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

_NAMES = {
    "Config": "config",
    "preset": "presets",
    "Dataset": "data.dataset",
    "load_dataset": "data.load",
    "UserError": "errors",
    "Interrupted": "errors",
    "MachineFault": "errors",
    "ResNet": "model.resnet",
    "TrainState": "model.steps",
    "eval_step": "model.steps",
    "predict": "model.steps",
    "train_step": "model.steps",
    "create_train_state": "model.parts",
    "evaluate": "runs.evaluation",
    "evaluate_checkpoint": "runs.evaluation",
    "restore": "checkpoint",
    "train_and_evaluate": "runs.loop",
    "sweep": "runs.sweeps",
    "train_many": "runs.sweeps",
    "export": "runs.export",
    "configure": "process",
    "caches": "process",
    "clear_caches": "process",
}
# The rooms and top-level modules, loaded on first use as attributes (rj.model.resnet, ...).
_MODULES = {
    "atomic",
    "checkpoint",
    "cli",
    "config",
    "data",
    "device",
    "errors",
    "flags",
    "model",
    "presets",
    "process",
    "runs",
    "tuning",
}
__all__ = sorted(_NAMES)


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
