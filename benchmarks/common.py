"""What the benchmarks share (their one helper module): model flags, a CIFAR-shaped random dataset
and its placement on the devices with a replicated train state, one JSON line per figure
(`emit`), reading XLA's HLO text, and the fastest of a speed.py sweep (gpu.sh:
`python benchmarks/common.py fastest SWEEP.jsonl TAG:FLAGS ...`)."""

import argparse
import dataclasses
import json
import re
import sys

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import flags
from resnet_jax.device import batches, parallel
from resnet_jax.device import data as device_data


def parser(description=None) -> argparse.ArgumentParser:
    """A benchmark's flags: train.py's own (every Config field, --preset, --cpu_devices, ...; from
    flags.build_parser, not declared again) and --batchnorm_derivative. A flag the benchmark adds
    afterwards replaces train.py's flag of the same name (speed.py's comma-separated --batch_size)."""
    p = argparse.ArgumentParser(
        description=description,
        parents=[flags.build_parser(add_help=False)],
        conflict_handler="resolve",
        allow_abbrev=False,
    )
    p.add_argument(
        "--batchnorm_derivative",
        default="custom",
        choices=("custom", "autodiff"),
        help="autodiff: BatchNorm differentiated by JAX instead of layers.normalize's own JVP (an A/B)",
    )
    return p


def parse(p):
    """The flags, on top of --preset's values when one is named (as train.py parses them)."""
    return flags.parse(p)


def use_batchnorm_derivative(kind: str):
    """'custom': layers.normalize as the library has it. 'autodiff': the same function without its
    custom JVP (JAX differentiates the formula: each per-channel sum of the backward pass its own
    reduction), to measure what the custom JVP buys. Changes this process's resnet_jax.layers."""
    from resnet_jax.model import layers

    if kind == "autodiff" and hasattr(layers.normalize, "fun"):
        layers.normalize = layers.normalize.fun


def model_config(args, **fields) -> rj.Config:
    """The Config the flags say, with `fields` replacing some (a benchmark's own sweeps)."""
    use_batchnorm_derivative(args.batchnorm_derivative)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(rj.Config)}
    values.update(fields)
    return rj.Config(**values)


def configure_devices(args, config):
    """As train.py: the process's settings (resnet_jax.tuning.setup) before JAX starts its backends."""
    rj.configure(config, args.cpu_devices, compilation_cache=args.compilation_cache)


def random_cifar(n_train, n_test, seed=0) -> rj.Dataset:
    """CIFAR-shaped uint8 images with random labels: speed does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    return rj.Dataset(
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_test),
        num_classes=10,
    )


def setup(args, dataset, **config_fields):
    """(config, mesh, device data, replicated state, epoch key, permutation) for timing."""
    config = model_config(args, **config_fields)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    n = len(dataset.train_images)
    data = device_data.to_device(dataset, rj.data.dataset.pixel_mean(dataset.train_images), config, mesh)
    steps = batches.steps_per_epoch(n, config.batch_size)
    state = parallel.replicate(
        jax.device_get(rj.create_train_state(config, jax.random.key(0), dataset.image_shape, steps)), mesh
    )
    key = batches.epoch_key(jax.random.key(1), 0)
    return config, mesh, data, state, key, batches.permutation(key, n)


def emit(result: dict, out=None):
    """One JSON line per figure: printed, and appended to `out` when given."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def computations(text):
    """{computation name: [instruction lines]} of an HLO module's text (`compiled.as_text()`)."""
    out, name = {}, None
    for line in text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            name = head.group(1)
            out[name] = []
        elif name and line.strip() == "}":
            name = None
        elif name:
            out[name].append(line)
    return out


def op_of(line):
    m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][\w\-]*)\(", line)
    return m.group(1) if m else None


def first_match(text: str, table, default: str) -> str:
    """The label of the first (label, regex) in `table` that matches `text`, else `default`."""
    return next((label for label, pattern in table if re.search(pattern, text)), default)


def fastest(rows, variants):
    """The FLAGS of the fastest tagged speed.py line (`flags_TAG`) of TAG:FLAGS `variants`: the
    one that would run 50 epochs soonest (50 x its s/epoch + its compile time, which holds the
    CUDA graphs' creation), or "" (resnet_jax's defaults) when none is there."""
    flags = dict(v.split(":", 1) for v in variants)
    timed = [r for r in rows if r.get("tag", "").removeprefix("flags_") in flags]
    if not timed:
        return ""
    best = min(timed, key=lambda r: 50 * r["epoch_s"] + r["compile_s"])
    return flags[best["tag"].removeprefix("flags_")]


if __name__ == "__main__" and sys.argv[1:2] == ["fastest"]:
    with open(sys.argv[2]) as f:
        print(fastest([json.loads(line) for line in f if line.strip()], sys.argv[3:]))
