"""A run's story and its outputs: one run (`loop`), many (`sweeps`, `summary`), evaluation
(`evaluation`), what is written and printed behind one gate (`writer`, `console`, `plots`), and
Ctrl-C as a saved stop (`interrupt`)."""

from resnet_jax._rooms import submodules

__getattr__ = submodules(__name__)
