"""The package's shape (docs/layout.md): rooms whose imports run one way, short modules, and the
public names at the top."""

import ast
import os

import resnet_jax as rj

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resnet_jax")
# Lowest first: a module may import from its own layer and the layers before it, never after.
LAYERS = (
    ("errors", "config", "presets", "atomic", "tuning", "process", "_rooms"),
    ("data",),
    ("model",),
    ("device",),
    ("checkpoint",),
    ("runs",),
    ("flags", "cli", "__main__", "__init__"),
)


def modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def room(name: str) -> str:
    """The room (subpackage) or top-level module a module belongs to."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room(name) in rooms)


def imports(path: str, known) -> set:
    """The package's modules a module imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnet_jax"):
            if node.module != "resnet_jax":  # the package itself (its __version__) comes first anyway
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known}


def test_imports_between_rooms_run_one_way():
    known = modules()
    wrong = [
        f"{name} imports {target}"
        for name, path in known.items()
        for target in imports(path, known)
        if room(target) != room(name) and layer(target) > layer(name)
    ]
    assert not wrong, wrong
    assert {room(n) for n in known} == {r for rooms in LAYERS for r in rooms}  # every room has a layer


def test_no_module_is_over_400_lines():
    long = {n: c for n, p in modules().items() if (c := len(open(p).read().splitlines())) > 400}
    assert not long, long


def test_the_top_holds_what_a_notebook_uses():
    notebook = {
        "train_and_evaluate", "sweep", "train_many", "restore", "evaluate", "evaluate_checkpoint",
        "predict", "load_dataset", "Dataset", "Config", "preset", "ResNet", "create_train_state",
        "train_step", "eval_step", "TrainState", "UserError", "MachineFault", "Interrupted",
    }  # fmt: skip
    assert notebook <= set(rj.__all__)
    for name in rj.__all__:
        assert getattr(rj, name) is not None, name
    assert callable(rj.model.augment.augment) and rj.model.resnet.ResNet is rj.ResNet  # rooms, by name
