"""How it runs on the devices: the mesh and many hosts (`parallel`, `distributed`), the dataset
on the devices (`data`), which images each step trains on (`batches`), the compiled programs
(`programs`), the queue of device calls (`calls`), and metrics summed on the way (`metrics`)."""

from resnet_jax._rooms import submodules

__getattr__ = submodules(__name__)
