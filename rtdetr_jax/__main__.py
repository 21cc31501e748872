import sys

from rtdetr_jax.cli import main

sys.exit(main())
