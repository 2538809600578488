"""The one configuration record. Its defaults are the seed recipe (shared/RECIPE.md)."""

from __future__ import annotations

import dataclasses
import json

from resnet_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
L2_LAYERS = ("conv", "dense")


def _f(default, help: str):
    """A Config field with its --help text (train.py's flags are generated from these)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run. `train.py` generates one flag per field from this class."""

    # Data (resnet_jax.data).
    dataset: str = _f("cifar10", "cifar10 | cifar100 (tfds or official archive)")
    data_dir: str | None = _f(None, "tfds data_dir, or a folder / archive in the official layout")
    # Loop (resnet_jax.loop).
    epochs: int = _f(50, "passes over the training set")
    batch_size: int = _f(32, "global batch over all devices; the final partial batch is kept")
    seed: int = _f(0, "init and data keys derive from it")
    steps_per_call: int = _f(100, "train steps per device call; metrics come back once per call")
    device_loop: str = _f("auto", "scan | python | auto (scan on GPU/TPU, python on CPU; see tuning)")
    eval_batch_size: int = _f(1000, "exact over the whole test set (padded and masked)")
    # Optimisation (resnet_jax.optim): Keras-form Adam, piecewise-constant rate.
    learning_rate: float = _f(1e-3, "rate of the first epochs")
    lr_epochs: tuple[int, ...] = _f((26, 36, 46), "boundaries, in epochs")
    lr_factors: tuple[float, ...] = _f((0.1, 0.01, 0.5), "optax scales: each multiplies the rate so far")
    adam_b1: float = _f(0.9, "Adam first-moment decay")
    adam_b2: float = _f(0.999, "Adam second-moment decay")
    adam_eps: float = _f(1e-7, "added to the uncorrected sqrt(v), as Keras does")
    l2_weight: float = _f(1e-4, "weight * sum(kernel**2), inside the loss, no 0.5 factor")
    l2_layers: tuple[str, ...] = _f(("conv",), "which kernels it covers: conv and/or dense")
    # Augmentation (resnet_jax.augment).
    shift_range: float = _f(0.1, "fraction of height / width; real-valued bilinear shift")
    flip: bool = _f(True, "left-right with p = 0.5")
    # Model (resnet_jax.models).
    num_filters: int = _f(32, "width of the first stage; doubles per stage")
    stage_sizes: tuple[int, ...] = _f((3, 3, 2), "residual blocks per stage")
    num_classes: int = _f(10, "train_and_evaluate sets it from the dataset")
    bn_momentum: float = _f(0.99, "moving = momentum * moving + (1 - momentum) * batch")
    bn_epsilon: float = _f(1e-3, "Keras default (Flax: 1e-5)")
    dtype: str = _f("float32", "compute dtype; parameters, optimizer and BN statistics stay float32")

    def __post_init__(self):
        positive = ("epochs", "batch_size", "steps_per_call", "eval_batch_size", "num_filters", "num_classes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not self.stage_sizes or any(not isinstance(s, int) or s <= 0 for s in self.stage_sizes):
            raise UserError(f"stage_sizes must be positive integers like 3,3,2, got {self.stage_sizes!r}")
        if self.device_loop not in ("auto", "scan", "python"):
            raise UserError(f"device_loop must be auto, scan or python, got {self.device_loop!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if unknown := set(self.l2_layers) - set(L2_LAYERS):
            raise UserError(f"l2_layers may name only {', '.join(L2_LAYERS)}, got {sorted(unknown)}")
        if len(self.lr_epochs) != len(self.lr_factors):
            raise UserError(
                "lr_epochs and lr_factors must have the same length "
                f"({len(self.lr_epochs)} vs {len(self.lr_factors)})"
            )
        if list(self.lr_epochs) != sorted(self.lr_epochs) or any(e <= 0 for e in self.lr_epochs):
            raise UserError(f"lr_epochs must be increasing positive epochs, got {self.lr_epochs!r}")
        if not 0.0 <= self.shift_range < 1.0:
            raise UserError(f"shift_range must be in [0, 1), got {self.shift_range!r}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        raw = json.loads(text)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise UserError(
                f"saved config has unknown fields {unknown}; it was written by another version of resnet_jax"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)


# Fields that change what a checkpoint holds or how the run unfolds; a saved run refuses to
# resume with different values. Others (epochs, data_dir, steps_per_call, eval_batch_size) may
# change between invocations (so may device_loop) without changing the numbers of the epochs already run.
MODEL_FIELDS = ("num_filters", "stage_sizes", "num_classes", "dtype")
RUN_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(Config)
    if f.name not in ("epochs", "data_dir", "steps_per_call", "device_loop", "eval_batch_size")
)


def tiny(**overrides) -> Config:
    """A preset for tests and quick looks: 4 filters, one block per stage, 2 epochs."""
    base = dict(num_filters=4, stage_sizes=(1, 1, 1), epochs=2, steps_per_call=8)
    base.update(overrides)
    return Config(**base)
