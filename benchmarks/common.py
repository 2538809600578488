"""What the benchmarks share: model flags, a CIFAR-shaped random dataset and its placement on the
devices with a replicated train state."""

import argparse
import dataclasses

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import cli, parallel, pipeline


def parser(description=None) -> argparse.ArgumentParser:
    """A benchmark's flags: train.py's own (every Config field, --preset, --cpu_devices, ...; from
    cli.build_parser, not declared again) and --batchnorm_derivative. A flag the benchmark adds
    afterwards replaces train.py's flag of the same name (speed.py's comma-separated --batch_size)."""
    p = argparse.ArgumentParser(
        description=description,
        parents=[cli.build_parser(add_help=False)],
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
    return cli.parse(p)


def use_batchnorm_derivative(kind: str):
    """'custom': layers.normalize as the library has it. 'autodiff': the same function without its
    custom JVP (JAX differentiates the formula: each per-channel sum of the backward pass its own
    reduction), to measure what the custom JVP buys. Changes this process's resnet_jax.layers."""
    from resnet_jax import layers

    if kind == "autodiff" and hasattr(layers.normalize, "fun"):
        layers.normalize = layers.normalize.fun


def model_config(args, **fields) -> rj.Config:
    """The Config the flags say, with `fields` replacing some (a benchmark's own sweeps)."""
    use_batchnorm_derivative(args.batchnorm_derivative)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(rj.Config)}
    values.update(fields)
    return rj.Config(**values)


def configure_devices(args, config):
    """As train.py: the platform decisions (resnet_jax.tuning) before JAX starts its backends."""
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
    data = pipeline.to_device(dataset, rj.dataset.pixel_mean(dataset.train_images), config, mesh)
    spe = pipeline.steps_per_epoch(n, config.batch_size)
    state = parallel.replicate(
        jax.device_get(rj.create_train_state(config, jax.random.key(0), dataset.image_shape, spe)), mesh
    )
    key = pipeline.epoch_key(jax.random.key(1), 0)
    return config, mesh, data, state, key, pipeline.permutation(key, n)
