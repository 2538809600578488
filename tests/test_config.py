"""Each Config field declares its roles (what a resume does with it, whether a compiled program
reads it, whether a sweep may vary it); every list of fields is derived from them, and the
programs read exactly the fields marked as theirs."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import config
from resnet_jax.checkpoint import template
from resnet_jax.device import data as device_data
from resnet_jax.device import parallel, programs

# A valid value other than the default, for every field.
OTHER = {
    "dataset": "mnist",
    "data_dir": "/data/elsewhere",
    "val_split": 0.1,
    "test_split": 0.3,
    "image_size": (16, 16),
    "epochs": 3,
    "batch_size": 16,
    "seed": 5,
    "steps_per_call": 7,
    "device_loop": "scan",
    "eval_batch_size": 100,
    "learning_rate": 0.01,
    "lr_epochs": (10, 20, 30),
    "lr_factors": (0.5, 0.5, 0.5),
    "adam_b1": 0.8,
    "adam_b2": 0.99,
    "adam_eps": 1e-5,
    "l2_weight": 0.5,
    "l2_layers": ("conv", "dense"),
    "shift_range": 0.2,
    "flip": False,
    "resnet_version": 2,
    "num_filters": 8,
    "stage_sizes": (2, 2, 2),
    "num_classes": 11,
    "class_names": ("cat", "dog"),
    "bn_momentum": 0.9,
    "bn_epsilon": 1e-5,
    "dtype": "bfloat16",
    "preset": "tiny",
}
NAMES = [f.name for f in dataclasses.fields(rj.Config)]


def test_every_field_has_its_roles_and_the_lists_come_from_them():
    assert sorted(OTHER) == sorted(NAMES)  # a new field needs a value here, and roles below
    for f in dataclasses.fields(rj.Config):
        assert f.metadata["resume"] in config.RESUME, f.name
        assert isinstance(f.metadata["program"], bool), f.name
        assert f.metadata["unswept"] is None or f.metadata["unswept"].strip(), f.name
        assert f.metadata["help"].strip(), f.name
    refused, applied, free = config.FIXED_FIELDS, config.CHANGEABLE_FIELDS, config.NO_NUMBER
    assert sorted(refused + applied + free) == sorted(NAMES)  # each field exactly one resume role
    assert set(config.MODEL_FIELDS) < set(refused)
    assert set(config.PROGRAM_FIELDS) <= set(refused + applied)  # a program field changes numbers
    assert config.program_config(rj.Config(l2_weight=0.5, seed=3)) == rj.Config(l2_weight=0.5)
    with pytest.raises(ValueError, match="resume must be one of"):
        config._f(1, "a field", resume="sometimes")


@pytest.fixture(scope="module")
def lowered():
    """The text of the lowered train step and evaluation for a state whose Config is `config`
    (the full Config, not reduced to its program fields as the run's programs take it)."""
    base = rj.presets.tiny(batch_size=8, eval_batch_size=8)
    model = rj.model.resnet.from_config(base)
    tx = rj.model.optim.make_optimizer(base, 10)
    mesh = parallel.make_mesh(jax.devices()[:1])
    like = template(model, tx, base, (32, 32, 3))
    state = device_data.abstract(like, mesh)
    images = np.zeros((16, 32, 32, 3), np.uint8)
    data = device_data.to_device(
        rj.Dataset(images, np.arange(16) % 10, images, np.arange(16) % 10), 0, base, mesh
    )
    perm, key = np.arange(16, dtype=np.int32), jax.random.key(0)
    step = jax.jit(functools.partial(programs._train_chunk, mesh=mesh), static_argnames=("length", "batch"))
    evaluate = jax.jit(functools.partial(programs._evaluate, batch=8, mesh=mesh))

    def text(config):
        s = state.replace(config=config)
        return (
            step.lower(s, data, perm, 0, 0, key, length=1, batch=8).as_text(),
            evaluate.lower(s, data).as_text(),
        )

    return base, text


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_programs_read_exactly_the_program_fields(lowered, name):
    """Change one field of the state's Config: the lowered train step or evaluation changes if
    and only if the field is a program field (one the programs' reduced Config keeps)."""
    base, text = lowered
    other = dataclasses.replace(base, **{name: OTHER[name]})
    changed = text(other) != text(base)
    assert changed == (name in config.PROGRAM_FIELDS), (name, "read by a program" if changed else "not read")


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: rj.Config(learnign_rate=0.01),
            "'learnign_rate' is not a setting of resnet_jax.Config; did you mean learning_rate?",
        ),
        (
            lambda: rj.preset("tiny", epochz=3),
            "'epochz' is not a setting of resnet_jax.Config; did you mean epochs?",
        ),
        (lambda: rj.Config(learning_rate="fast"), "learning_rate takes a float, got 'fast'"),
        (lambda: rj.Config(epochs=2.5), "epochs takes an int, got 2.5"),
        (lambda: rj.Config(epochs=True), "epochs takes an int, got True"),
        (lambda: rj.Config(flip="maybe"), "flip takes true or false, got 'maybe'"),
        (lambda: rj.Config(stage_sizes=[1, 2.5]), "stage_sizes takes ints like (3,3,2), got [1, 2.5]"),
        (
            lambda: rj.sweep(rj.Config(), "unused", grid={"learnign_rate": [1e-3]}),
            "did you mean learning_rate?",
        ),
        (lambda: rj.sweep(rj.Config(), "unused", grid={"flip": ["maybe"]}), "flip takes true or false"),
    ],
)
def test_the_python_apis_mistakes_are_one_user_error_naming_the_field(make, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rj.UserError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert e.value._render_traceback_() == [f"UserError: {e.value}"]  # what Jupyter shows: one line
    assert not (tmp_path / "unused").exists()


def test_text_and_single_items_are_read_as_the_command_line_reads_them():
    config = rj.Config(learning_rate="0.01", stage_sizes="1,1,1", flip="no", lr_factors=[1, 2, 3], epochs="4")
    assert (config.learning_rate, config.stage_sizes, config.flip, config.epochs) == (
        0.01,
        (1, 1, 1),
        False,
        4,
    )
    assert config.lr_factors == (1.0, 2.0, 3.0) and rj.Config(l2_layers="conv").l2_layers == ("conv",)
    assert rj.Config(stage_sizes=3).stage_sizes == (3,) and rj.Config(epochs=np.int64(3)).epochs == 3
    from resnet_jax.runs import sweeps

    assert sweeps.check_grid({"learning_rate": 1e-3}) == (("learning_rate", (1e-3,)),)  # a list of one
    assert sweeps.check_grid({"stage_sizes": (1, 1, 1)}) == (("stage_sizes", ((1, 1, 1),)),)
    assert sweeps.check_grid({"stage_sizes": [(1, 1, 1), "3,3,2"]}) == (
        ("stage_sizes", ((1, 1, 1), (3, 3, 2))),
    )
