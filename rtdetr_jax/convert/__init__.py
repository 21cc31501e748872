"""Weight conversion: transformers safetensors <-> flax (`transformers.py`), authors' .pth -> flax (`original.py`),
and `port`, which turns any supported source into a folder our loader reads."""
