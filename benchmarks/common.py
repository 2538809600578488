"""What the benchmarks share: model flags, a CIFAR-shaped random dataset placed on the devices, and
a timer for one jitted function."""

import time

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import parallel, pipeline


def add_model_args(parser, cpu_devices="auto"):
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_filters", type=int, default=32)
    parser.add_argument("--stage_sizes", default="3,3,2")
    parser.add_argument("--cpu_devices", default=cpu_devices,
                        help="as train.py: CPU split into per-core devices")


def setup(args, n_train, n_test, **config_fields):
    """(config, mesh, device data, replicated state, epoch key, permutation) for timing."""
    config = rj.Config(batch_size=args.batch_size, num_filters=args.num_filters,
                       stage_sizes=tuple(int(s) for s in args.stage_sizes.split(",")), **config_fields)
    parallel.configure_cpu_devices(args.cpu_devices, args.batch_size,
                                   args.batch_size * rj.models.forward_flops(config))
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    rng = np.random.default_rng(0)
    ds = rj.Dataset(rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n_train),
                    rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n_test))
    data = pipeline.to_device(ds, rj.data.pixel_mean(ds.train_images), config, mesh)
    state = parallel.replicate(jax.device_get(
        rj.create_train_state(config, jax.random.key(0), (32, 32, 3), 1563)), mesh)
    key = pipeline.epoch_key(jax.random.key(1), 0)
    return config, mesh, data, state, key, pipeline.permutation(key, n_train)


def timed(f, *args, n=50):
    """Milliseconds per call of jax.jit(f)(*args): the mean of n calls after a finished warm-up."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n * 1e3
