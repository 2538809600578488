"""Train the seed ResNet on CIFAR-10: `python train.py --workdir ckpt` (see --help)."""

import sys

from resnet_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
