"""A room's modules as attributes, imported on first use (rj.model.resnet without importing it)."""

import importlib


def submodules(package: str):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
