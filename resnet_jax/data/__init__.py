"""Where images come from: `load.load_dataset` picks a source (an image folder or its archive,
the official CIFAR archive, tensorflow-datasets) and returns a `dataset.Dataset` of host arrays;
decoded folders are cached (`cache`)."""

from resnet_jax._rooms import submodules

__getattr__ = submodules(__name__)
