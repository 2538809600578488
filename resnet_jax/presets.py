"""Named recipes: a preset is a function returning a Config (the seed's, the tiny one for quick
looks, the Keras example's table of depths)."""

from __future__ import annotations

from resnet_jax.config import Config
from resnet_jax.errors import UserError


def tiny(**overrides) -> Config:
    """A preset for tests and quick looks: 4 filters, one block per stage, 2 epochs."""
    base = dict(num_filters=4, stage_sizes=(1, 1, 1), epochs=2, steps_per_call=8, preset="tiny")
    base.update(overrides)
    return Config(**base)


# The Keras example's table (examples/cifar10_resnet.py): depth 6n+2 for v1, 9n+2 for v2, 16
# filters, batch 32, Adam 1e-3 (Keras form), L2 1e-4 on conv kernels, shift 0.1 + flip, 200
# epochs. Its lr_schedule(epoch) gets the 0-based epoch and tests `epoch > 80` etc.: in 1-based
# epochs 1-81 at 1e-3, 82-121 1e-4, 122-161 1e-5, 162-181 1e-6, 182-200 5e-7.
KERAS_DEPTHS = {1: (20, 32, 44, 56, 110, 164), 2: (20, 56, 110, 164, 1001)}
PRESETS = ("seed",) + tuple(f"resnet{d}v{v}" for v, depths in KERAS_DEPTHS.items() for d in depths)
NAMES = PRESETS + ("tiny",)  # every name preset() knows


def preset(name: str, **overrides) -> Config:
    """The Config of a named recipe: `seed` (the default Config), `tiny` (4 filters, one block
    a stage, 2 epochs: for quick looks) or a row of the Keras example's table (resnet20v1 ...
    resnet1001v2); `overrides` replace fields: `rj.preset("resnet20v1", epochs=30)`."""
    if name == "seed":
        return Config(preset="seed", **overrides)
    if name == "tiny":
        return tiny(**overrides)
    for version, depths in KERAS_DEPTHS.items():
        for depth in depths:
            if name == f"resnet{depth}v{version}":
                n = (depth - 2) // (6 if version == 1 else 9)
                fields = dict(
                    resnet_version=version,
                    num_filters=16,
                    stage_sizes=(n, n, n),
                    epochs=200,
                    lr_epochs=(81, 121, 161, 181),
                    lr_factors=(0.1, 0.1, 0.1, 0.5),
                    batch_size=32,
                    learning_rate=1e-3,
                    l2_weight=1e-4,
                    shift_range=0.1,
                    flip=True,
                    preset=name,
                )
                fields.update(overrides)
                return Config(**fields)
    raise UserError(f"unknown preset {name!r}; choose one of {', '.join(NAMES)}")
