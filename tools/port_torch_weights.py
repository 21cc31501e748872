#!/usr/bin/env python
"""Convert RT-DETRv2 PyTorch weights for rtdetr-jax; the same as `rtdetr-jax port` (see `--help`)."""

import sys

from rtdetr_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["port", *sys.argv[1:]]))
