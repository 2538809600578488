"""`python -m resnet_jax`: the command line, as `train.py` and the `resnet-jax` command."""

import sys

from resnet_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
