"""The one configuration record. Its defaults are the seed recipe (shared/RECIPE.md)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import numbers
import os
import types

from resnet_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
L2_LAYERS = ("conv", "dense")


# What a resume does with a field whose value differs from the saved run's (each field says):
#   model  refused: the model the checkpoint holds (its shapes and numerics)
#   run    refused: the data, the seed, the batch and the split (the order of the images)
#   apply  applied from the resumed step on, printed and recorded in run.json's "changes" (as
#          recompiling a Keras model does): optimisation, augmentation, length
#   free   changes no number (where the data is read from, how steps group into device calls, ...)
RESUME = ("model", "run", "apply", "free")


def _f(default, help: str, *, resume: str, program: bool = False, unswept: str | None = None):
    """A Config field with its --help text and its roles: `resume` (RESUME), `program` (a compiled
    train or evaluation program reads it: config.program_config keeps it), `unswept` (why a sweep
    cannot vary it; None: it can). train.py's flags and every list of fields come from these."""
    if resume not in RESUME:
        raise ValueError(f"resume must be one of {RESUME}, got {resume!r}")
    return dataclasses.field(
        default=default, metadata={"help": help, "resume": resume, "program": program, "unswept": unswept}
    )


SAME_DATA = "a sweep compares settings on one dataset: run one sweep per dataset"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run. `train.py` generates one flag per field from this class."""

    # Data (resnet_jax.data).
    dataset: str = _f(
        "cifar10",
        "any tensorflow-datasets image-classification name (cifar10, cifar100, mnist, fashion_mnist, "
        "svhn_cropped, ...); a run records `folder` or `arrays` for data given otherwise",
        resume="run",
        unswept=SAME_DATA,
    )
    data_dir: str | None = _f(
        None,
        "a folder of images in class subfolders (train/<class>/*, test/<class>/*) or its .tar.gz; "
        "the official CIFAR archive or its folder; or a tfds data_dir",
        resume="free",
        unswept=SAME_DATA,
    )
    test_split: float = _f(
        0.2,
        "a folder of class subfolders without train/ and test/: the images held out as its test set "
        "(a fraction < 1, or a count; seeded with 0 whatever --seed, stratified by class)",
        resume="run",
        unswept=SAME_DATA,
    )
    image_size: tuple[int, ...] = _f(
        (),
        "an image folder's images resized to H,W on load (bilinear, as Keras's image_size); "
        "empty: as they are, all of one size",
        resume="run",
        unswept=SAME_DATA,
    )
    val_split: float = _f(
        0.0,
        "training images held out for validation: a count, or a fraction < 1; "
        "0: the test set validates, as in the seed",
        resume="run",
    )
    # Loop (resnet_jax.loop).
    epochs: int = _f(50, "passes over the training set", resume="apply")
    batch_size: int = _f(32, "global batch over all devices; the final partial batch is kept", resume="run")
    seed: int = _f(
        0,
        "init and data keys derive from it",
        resume="run",
        unswept="seeds are given with --seeds (seeds= in Python)",
    )
    steps_per_call: int = _f(
        100,
        "train steps per device call on the scan loop (GPU/TPU), metrics read once per call; the CPU's "
        "python loop paces its calls to about 0.5 s, at most this many steps",
        resume="free",
    )
    device_loop: str = _f(
        "auto", "scan | python | auto (scan on GPU/TPU, python on CPU; see tuning)", resume="free"
    )
    eval_batch_size: int = _f(1000, "exact over the whole test set (padded and masked)", resume="free")
    # Optimisation (resnet_jax.optim): Keras-form Adam, piecewise-constant rate.
    learning_rate: float = _f(1e-3, "rate of the first epochs", resume="apply")
    lr_epochs: tuple[int, ...] = _f((26, 36, 46), "boundaries, in epochs", resume="apply")
    lr_factors: tuple[float, ...] = _f(
        (0.1, 0.01, 0.5), "optax scales: each multiplies the rate so far", resume="apply"
    )
    adam_b1: float = _f(0.9, "Adam first-moment decay", resume="apply")
    adam_b2: float = _f(0.999, "Adam second-moment decay", resume="apply")
    adam_eps: float = _f(1e-7, "added to the uncorrected sqrt(v), as Keras does", resume="apply")
    l2_weight: float = _f(
        1e-4, "weight * sum(kernel**2), inside the loss, no 0.5 factor", resume="apply", program=True
    )
    l2_layers: tuple[str, ...] = _f(
        ("conv",), "which kernels it covers: conv and/or dense", resume="apply", program=True
    )
    # Augmentation (resnet_jax.augment).
    shift_range: float = _f(
        0.1, "fraction of height / width; real-valued bilinear shift", resume="apply", program=True
    )
    flip: bool = _f(True, "left-right with p = 0.5", resume="apply", program=True)
    # Model (resnet_jax.models).
    resnet_version: int = _f(
        1, "ResNet version: 1 (basic blocks, the seed's) or 2 (pre-activation bottlenecks)", resume="model"
    )
    num_filters: int = _f(
        32, "v1: width of the first stage, doubling per stage; v2: stem width", resume="model"
    )
    stage_sizes: tuple[int, ...] = _f((3, 3, 2), "residual blocks per stage", resume="model")
    num_classes: int = _f(
        10,
        "train_and_evaluate sets it from the dataset",
        resume="model",
        unswept="it is set from the dataset",
    )
    class_names: tuple[str, ...] = _f(
        (),
        "train_and_evaluate sets them from the dataset (its classes by label, when it names them)",
        resume="free",
        unswept="they are set from the dataset",
    )
    bn_momentum: float = _f(0.99, "moving = momentum * moving + (1 - momentum) * batch", resume="model")
    bn_epsilon: float = _f(1e-3, "added to the variance; Keras's value (Flax's is 1e-5)", resume="model")
    dtype: str = _f(
        "float32", "compute dtype; parameters, optimizer and BN statistics stay float32", resume="model"
    )
    preset: str = _f(
        "",
        "the preset this config started from (see --preset); informational",
        resume="free",
        unswept="sweep the fields a preset sets (num_filters, stage_sizes, ...), or run one sweep per preset",
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a value of the field's type, as its flag reads it
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name)))
        positive = ("epochs", "batch_size", "steps_per_call", "eval_batch_size", "num_filters", "num_classes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not self.stage_sizes or any(not isinstance(s, int) or s <= 0 for s in self.stage_sizes):
            raise UserError(f"stage_sizes must be positive integers like 3,3,2, got {self.stage_sizes!r}")
        if self.device_loop not in ("auto", "scan", "python"):
            raise UserError(f"device_loop must be auto, scan or python, got {self.device_loop!r}")
        if self.resnet_version not in (1, 2):
            raise UserError(f"resnet_version must be 1 or 2, got {self.resnet_version!r}")
        if not 0 < self.test_split and (self.test_split < 1 or self.test_split == int(self.test_split)):
            raise UserError(
                f"test_split must be a count of images or a fraction in (0, 1), got {self.test_split!r}"
            )
        if self.image_size and (len(self.image_size) != 2 or min(self.image_size) <= 0):
            raise UserError(f"image_size takes a height and a width like 32,32, got {self.image_size!r}")
        if self.val_split < 0 or (self.val_split >= 1 and self.val_split != int(self.val_split)):
            raise UserError(
                f"val_split must be a count of images or a fraction in [0, 1), got {self.val_split!r}"
            )
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
        if "version" in raw:  # the field's name before resnet_jax 0.3
            raw["resnet_version"] = raw.pop("version")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise UserError(
                f"saved config has unknown fields {unknown}; it was written by another version of resnet_jax"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)


def fields_where(**roles) -> tuple[str, ...]:
    """The Config fields, in order, whose roles (see `_f`) have these values; a tuple of values
    matches any of them: fields_where(resume=("model", "run"))."""
    want = {k: v if isinstance(v, tuple) else (v,) for k, v in roles.items()}
    return tuple(
        f.name for f in dataclasses.fields(Config) if all(f.metadata[k] in v for k, v in want.items())
    )


MODEL_FIELDS = fields_where(resume="model")  # a resume refuses another model,
FIXED_FIELDS = fields_where(resume=("model", "run"))  # ... or other data, seed, batch or split;
CHANGEABLE_FIELDS = fields_where(resume="apply")  # applies these from the resumed step on;
NO_NUMBER = fields_where(resume="free")  # these change no number.
# What a compiled train or evaluation program reads from the state's Config (the loss's L2, the
# seed's augmentation; tests/test_config.py checks it against the lowered programs): runs that
# differ only elsewhere share their programs.
PROGRAM_FIELDS = fields_where(program=True)
# What a sweep cannot vary, and why.
NOT_SWEPT = {f.name: f.metadata["unswept"] for f in dataclasses.fields(Config) if f.metadata["unswept"]}


def program_config(config: Config) -> Config:
    """The Config a device program is compiled for: PROGRAM_FIELDS of `config`, defaults elsewhere."""
    return Config(**{name: getattr(config, name) for name in PROGRAM_FIELDS})


@functools.cache
def field_types() -> types.MappingProxyType:
    """{field: (type, item type for tuples)} of every Config field, from its annotation (read
    once: every Config checks its fields through it, and reading annotations costs ~1 ms)."""
    import typing

    hints = typing.get_type_hints(Config)
    out = {}
    for f in dataclasses.fields(Config):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is tuple:
            out[f.name] = (tuple, args[0])
        elif args:  # Optional[X]
            out[f.name] = (args[0], None)
        else:
            out[f.name] = (hint, None)
    return types.MappingProxyType(out)


BOOLS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


TUPLE_SEPARATOR = ":"  # between a tuple's items in a sweep's value: --sweep stage_sizes=1:1:1,3:3:2
KIND_NAMES = {int: "an int", float: "a float", str: "text"}


def parse_value(name: str, text: str, separator: str = ","):
    """A Config field's value from text, as its flag and `--sweep` read it (tuples: items split at
    `separator`); ValueError naming what was expected."""
    kind, item = field_types()[name]
    text = str(text).strip()
    if kind is bool:
        if text.lower() not in BOOLS:
            raise ValueError(f"{name} takes true or false, got {text!r}")
        return BOOLS[text.lower()]
    try:
        if kind is tuple:
            return tuple(item(v.strip()) for v in text.split(separator) if v.strip() != "")
        return kind(text)
    except ValueError:
        if kind is tuple:
            what = f"{'comma' if separator == ',' else repr(separator)}-separated {item.__name__}s"
        else:
            what = KIND_NAMES.get(kind, f"a {kind.__name__}")
        raise ValueError(f"{name} takes {what}, got {text!r}") from None


def _one(name: str, kind, value):
    """`value` as `kind` (int, float, bool, str): text read as the flag reads it; ints for floats;
    a UserError naming the field for anything else (a bool is not a number here)."""
    if isinstance(value, str) and kind is not str:
        try:
            return _parse_one(name, kind, value)
        except ValueError as e:
            raise UserError(str(e)) from None
    if kind is bool and isinstance(value, (bool, np_bool())):
        return bool(value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, (bool, np_bool())):
        return int(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool())):
        return float(value)
    if kind is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    what = "true or false" if kind is bool else KIND_NAMES.get(kind, kind.__name__)
    raise UserError(f"{name} takes {what}, got {value!r}")


def _parse_one(name: str, kind, text: str):
    """A scalar of `kind` from text (a tuple field's item, or the field itself)."""
    if kind is bool:
        if text.strip().lower() not in BOOLS:
            raise ValueError(f"{name} takes true or false, got {text!r}")
        return BOOLS[text.strip().lower()]
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"{name} takes {KIND_NAMES.get(kind, kind.__name__)}, got {text!r}") from None


def np_bool():
    import numpy as np

    return np.bool_


def coerce(name: str, value):
    """A Config field's value as its type: text parsed as its flag parses it ("0.01", "3,3,2"),
    a list or a single item for a tuple, numpy scalars as Python ones; else one UserError line."""
    kind, item = field_types()[name]
    if value is None and name in OPTIONAL:
        return None
    if kind is not tuple:
        return _one(name, kind, value)
    if isinstance(value, str):
        try:
            return parse_value(name, value)
        except ValueError as e:
            raise UserError(str(e)) from None
    items = value if isinstance(value, (list, tuple)) else (value,)
    try:
        return tuple(_one(name, item, v) for v in items)
    except UserError:
        example = ",".join(str(v) for v in getattr(Config, name, ()) or ()) or "A,B"
        items_of = {int: "ints", float: "numbers", str: "names"}.get(item, item.__name__)
        raise UserError(f"{name} takes {items_of} like ({example}), got {value!r}") from None


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))
OPTIONAL = ("data_dir",)


def unknown_field(name: str, where: str = "resnet_jax.Config") -> UserError:
    """One line for a setting that is not a Config field, with the closest one."""
    close = difflib.get_close_matches(str(name), FIELD_NAMES, n=1)
    hint = f"; did you mean {close[0]}?" if close else " (its fields are train.py's flags: --help lists them)"
    return UserError(f"{name!r} is not a setting of {where}{hint}")


def _checked_init(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for name in kwargs:
            if name not in FIELD_NAMES:
                raise unknown_field(name)
        if len(args) > len(FIELD_NAMES):
            raise UserError(
                f"resnet_jax.Config takes at most {len(FIELD_NAMES)} values; name them: Config(epochs=3)"
            )
        init(self, *args, **kwargs)

    return __init__


Config.__init__ = _checked_init(Config.__init__)
