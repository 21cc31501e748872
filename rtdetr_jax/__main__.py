import sys

from rtdetr_jax.cli import entry

sys.exit(entry())
