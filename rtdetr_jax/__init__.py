"""rtdetr-jax: RT-DETRv2 (arXiv 2407.17140) in JAX/Flax, with transformers' API and numerical parity.

The public names below are imported on first use (PEP 562), so that `import rtdetr_jax` (and the command line,
which may re-execute itself before doing anything: rtdetr_jax/host_memory.py) does not pay for importing jax.
"""

import importlib

# first, before anything can start JAX's CPU backend: measured XLA:CPU settings (rtdetr_jax/xla_flags.py)
from rtdetr_jax.xla_flags import apply_default_xla_flags

apply_default_xla_flags()

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "rtdetr_jax.config",
    "ConfigError": "rtdetr_jax.config",
    "ConversionError": "rtdetr_jax.convert.transformers",
    "DETECTION_FIELDS": "rtdetr_jax.model",
    "ImageLoadError": "rtdetr_jax.processing",
    "ModelNotFoundError": "rtdetr_jax.hub",
    "RTDetrImageProcessor": "rtdetr_jax.processing",
    "RTDetrResNetConfig": "rtdetr_jax.config",
    "RTDetrV2Config": "rtdetr_jax.config",
    "RTDetrV2Detector": "rtdetr_jax.modeling.detector",
    "RTDetrV2ForObjectDetection": "rtdetr_jax.model",
    "RTDetrV2ObjectDetectionOutput": "rtdetr_jax.modeling.detector",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rtdetr_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
