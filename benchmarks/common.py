"""What the benchmarks share: model flags, a CIFAR-shaped random dataset and its placement on the
devices with a replicated train state."""

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import parallel, pipeline


def add_model_args(parser, cpu_devices="auto"):
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_filters", type=int, default=32)
    parser.add_argument("--stage_sizes", default="3,3,2")
    parser.add_argument(
        "--preset", default="", help="a named model (resnet56v2, ...): replaces the two above"
    )
    parser.add_argument(
        "--cpu_devices", default=cpu_devices, help="as train.py: CPU split into per-core devices"
    )
    parser.add_argument(
        "--batchnorm_derivative",
        default="custom",
        choices=("custom", "autodiff"),
        help="autodiff: BatchNorm differentiated by JAX instead of layers.normalize's own JVP (an A/B)",
    )


def use_batchnorm_derivative(kind: str):
    """'custom': layers.normalize as the library has it. 'autodiff': the same function without its
    custom JVP (JAX differentiates the formula: each per-channel sum of the backward pass its own
    reduction), to measure what the custom JVP buys. Changes this process's resnet_jax.layers."""
    from resnet_jax import layers

    if kind == "autodiff" and hasattr(layers.normalize, "fun"):
        layers.normalize = layers.normalize.fun


def model_config(args, **fields) -> rj.Config:
    use_batchnorm_derivative(args.batchnorm_derivative)
    if args.preset:
        return rj.config.preset(args.preset, **fields)
    return rj.Config(
        num_filters=args.num_filters, stage_sizes=tuple(int(s) for s in args.stage_sizes.split(",")), **fields
    )


def configure_devices(args, config):
    """As train.py: the platform decisions (resnet_jax.tuning) before JAX starts its backends."""
    rj.configure(config, args.cpu_devices)


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
    data = pipeline.to_device(dataset, rj.data.pixel_mean(dataset.train_images), config, mesh)
    spe = pipeline.steps_per_epoch(n, config.batch_size)
    state = parallel.replicate(
        jax.device_get(rj.create_train_state(config, jax.random.key(0), dataset.image_shape, spe)), mesh
    )
    key = pipeline.epoch_key(jax.random.key(1), 0)
    return config, mesh, data, state, key, pipeline.permutation(key, n)
