"""The dependency floors of pyproject.toml hold.

`.ci/run` installs the lowest version of every direct dependency that resolves together (uv's
`--resolution lowest-direct`) into an environment of its own and runs SUBSET there with
RESNET_JAX_FLOORS=1. The subset trains, resumes, stops on a signal, survives SIGKILLs and
damaged checkpoints, loads every kind of data (tfds under mock_data, archives, image folders)
and builds, installs and runs the wheel. It leaves out tests that use newer test-only APIs
(`jax.enable_x64`, JAX's monitoring listeners, JAX's names of cached programs).

    python tests/test_floors.py     # the subset, as pytest arguments
"""

import importlib.metadata
import os

from packaging.requirements import Requirement
from packaging.version import Version

SUBSET = (
    "tests/test_floors.py",
    "tests/test_train.py",
    "tests/test_resume.py",
    "tests/test_survive.py",
    "tests/test_interrupt.py",
    "tests/test_data.py",
    "tests/test_package.py",
)


def floors():
    """{distribution: the lowest version pyproject.toml allows} of resnet_jax's dependencies."""
    out = {}
    for text in importlib.metadata.requires("resnet_jax") or ():
        req = Requirement(text)
        if req.marker is not None:  # an extra's (test, cuda12, ...)
            continue
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lows:
            out[req.name] = max(lows)
    return out


def test_the_installed_versions_are_allowed_and_in_the_floors_run_are_the_floors():
    found = floors()
    assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu"} <= set(found)
    at_floor = os.environ.get("RESNET_JAX_FLOORS") == "1"
    for name, low in found.items():
        installed = Version(importlib.metadata.version(name))
        assert installed >= low, f"{name} {installed} is below its floor {low}"
        if at_floor:  # .ci/run's lowest-direct environment: every floor installed as declared
            assert installed == low, f"{name} {installed}: the floors run should have {low}"


if __name__ == "__main__":
    print(" ".join(SUBSET))
