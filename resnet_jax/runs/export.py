"""A trained model leaves the library: `export` writes a function that takes raw uint8 images
(N, H, W, C), any N, and returns float32 class probabilities, with the preprocessing (the
training set's pixel mean), BatchNorm in inference mode and the weights inside it.

    format "jax"          PATH/model.jax    jax.export's serialized function for CPU and CUDA
                                            (a consumer needs jax and flatbuffers only)
    format "saved_model"  PATH/             a TensorFlow SavedModel through jax2tf: signature
                                            serving_default(images) -> {"probabilities"}, for
                                            tf.saved_model.load and TF Serving
    both                  PATH/model.json   class names, input and output, where it came from
                                            (workdir, step, val_acc), the jax version, the
                                            compatibility window

jax guarantees that a serialized function keeps loading in the jax releases of the 6 months
after it was written (backward compatibility of jax.export); the checkpoint stays the source of
truth: export again with a newer jax. ONNX is not offered: jax2onnx (0.17.1) would downgrade
orbax-checkpoint and add 28 packages (docs/export.md).

A PATH that exists must be an export already (its model.json says so): it is replaced whole, in
one rename; anything else there is refused, nothing overwritten.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError

FORMATS = ("jax", "saved_model")
MARK = "resnet_jax export"  # model.json's "format_of": what makes a folder an export
WINDOW = (
    "jax.export guarantees that this artifact loads with the jax releases of the 6 months after "
    "it was written; later, export it again from its checkpoint (the source of truth)"
)


def serving_function(state):
    """uint8 images (N, H, W, C) -> float32 probabilities (N, classes): the state's
    preprocessing, its model in inference mode (BatchNorm's moving statistics), its weights."""
    from resnet_jax.model import steps

    variables, mean, apply = state.variables(), jnp.asarray(state.pixel_mean), state.apply_fn

    def serve(images):
        logits = apply(variables, steps.preprocess(images, mean), train=False)
        return jax.nn.softmax(jnp.asarray(logits, jnp.float32))

    return serve


def export(source, path: str, which: str = "best", format: str = "jax", *, model=None) -> dict:
    """Export a trained model to `path`; returns model.json's record. `source`: a workdir (its
    `which` checkpoint: best or latest; `model=` for a run of your own model) or a state from
    train_and_evaluate or restore. `format`: "jax" (the default, no TensorFlow needed to load it)
    or "saved_model"."""
    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if which not in ("best", "latest"):
        raise UserError(f"which must be 'best' or 'latest', got {which!r}")
    target = os.path.abspath(os.path.expanduser(str(path)))
    _check_target(target)
    state, origin = _state(source, which, model)
    image_shape = tuple(int(d) for d in np.shape(state.pixel_mean))
    classes = state.config.num_classes
    serve = serving_function(state)
    names = list(state.config.class_names) or [str(i) for i in range(classes)]
    record = {
        "format_of": MARK,
        "format": format,
        "file": "model.jax" if format == "jax" else "saved_model.pb",
        "input": {"shape": [None, *image_shape], "dtype": "uint8", "what": "raw images, NHWC, 0-255"},
        "output": {
            "shape": [None, classes],
            "dtype": "float32",
            "what": "class probabilities (softmax), in the order of class_names",
        },
        "class_names": names,
        "source": origin,
        "jax_version": jax.__version__,
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "compatibility": WINDOW,
    }
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    building = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        if format == "jax":
            _write_jax(serve, image_shape, os.path.join(building, "model.jax"))
        else:
            _write_saved_model(serve, image_shape, building)
        record["bytes"] = _size(building)
        with open(os.path.join(building, "model.json"), "w") as f:
            json.dump(record, f, indent=1)
        _swap_in(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return record


def _check_target(target: str):
    """Refuse a path that is a file, or a folder holding anything but an export."""
    if os.path.isfile(target):
        raise UserError(f"{target} is a file; export to a new folder (nothing was overwritten)")
    if os.path.isdir(target) and os.listdir(target):
        try:
            with open(os.path.join(target, "model.json")) as f:
                ours = json.load(f).get("format_of") == MARK
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(
                f"{target} holds files that are not a resnet_jax export; export to a new folder "
                "(nothing was overwritten)"
            )


def _state(source, which: str, model):
    """(state, where it came from) of a workdir's checkpoint or a state."""
    from resnet_jax.checkpoint import open_run, restore_with_meta

    if isinstance(source, (str, os.PathLike)):
        path = open_run(str(source))[0]
        state, progress, step = restore_with_meta(path, which, model=model)
        best = progress.best_val_acc if which == "best" else (progress.history or [{}])[-1].get("val_acc")
        origin = {"workdir": path, "checkpoint": which, "step": int(step), "epoch": progress.epoch}
        return state, {**origin, "val_acc": best}
    if not all(hasattr(source, a) for a in ("apply_fn", "pixel_mean", "config", "params")):
        raise UserError(
            "export takes a workdir or a state from train_and_evaluate or restore, got "
            f"{type(source).__name__}"
        )
    return source, {
        "workdir": None,
        "checkpoint": "a state in memory",
        "step": int(jax.device_get(source.step)),
    }


def _write_jax(serve, image_shape, file: str):
    from jax import export as jax_export

    (batch,) = jax_export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
    exported = jax_export.export(jax.jit(serve), platforms=("cpu", "cuda"))(images)
    with open(file, "wb") as f:
        f.write(exported.serialize())


def _write_saved_model(serve, image_shape, folder: str):
    from resnet_jax.data.tfds_data import tensorflow

    tf = tensorflow()
    from jax.experimental import jax2tf

    h, w, c = image_shape
    converted = jax2tf.convert(
        serve, polymorphic_shapes=[f"(b, {h}, {w}, {c})"], native_serialization_platforms=("cpu", "cuda")
    )
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"probabilities": converted(images)},
        input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name="images")],
        autograph=False,
    )
    tf.saved_model.save(module, folder, signatures={"serving_default": module.serve})


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, files in os.walk(folder) for n in files)


RENAME_EXCHANGE = 2


def _swap_in(built: str, target: str):
    """`built` becomes `target` in one rename: over an earlier export, the two folders are
    exchanged atomically (renameat2's RENAME_EXCHANGE, Linux) and the old one removed; where
    that is not available, the old one is moved aside first."""
    if not os.path.exists(target):
        os.rename(built, target)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        exchanged = libc.renameat2(-100, os.fsencode(built), -100, os.fsencode(target), RENAME_EXCHANGE) == 0
    except (AttributeError, OSError):
        exchanged = False
    if not exchanged:
        aside = built + ".old"
        os.rename(target, aside)
        os.rename(built, target)
        built = aside
    shutil.rmtree(built, ignore_errors=True)
