"""What is trained: the ResNet (`resnet`, `layers`), the optimizer and schedule (`optim`), the
augmentation (`augment`), the state and its pure train and eval steps (`steps`), and the parts
of a run, yours or the Config's, checked and recorded (`parts`)."""

from resnet_jax._rooms import submodules

__getattr__ = submodules(__name__)
