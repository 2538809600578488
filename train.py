"""Train the seed ResNet on CIFAR-10: `python train.py --workdir ckpt` (see --help)."""

import sys

from resnet_jax.hugepages import reexec_with_huge_pages
from resnet_jax.cli import main

if __name__ == "__main__":
    reexec_with_huge_pages()  # restarts once with huge-page malloc where that helps (hugepages.py)
    sys.exit(main())
