import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import resnet_jax as rj  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where JAX's default backend is a GPU (benchmarks/gpu.sh)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if gpu_tests and jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU (JAX default backend is "
                                f"{jax.default_backend()})")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture
def tiny_config():
    return rj.tiny(batch_size=8, eval_batch_size=16)


def random_dataset(n_train=64, n_test=24, shape=(32, 32, 3), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rj.Dataset(rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
                      rng.integers(0, classes, n_train),
                      rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
                      rng.integers(0, classes, n_test), num_classes=classes)


def random_batch(n=8, shape=(32, 32, 3), classes=10, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n,) + shape), jax.random.randint(k2, (n,), 0, classes)
