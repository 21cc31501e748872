"""rtdetr-jax: RT-DETRv2 (arXiv 2407.17140) in JAX/Flax, with transformers' API and numerical parity."""

# first, before anything can start JAX's CPU backend: measured XLA:CPU settings (rtdetr_jax/xla_flags.py)
from rtdetr_jax.xla_flags import apply_default_xla_flags

apply_default_xla_flags()

from rtdetr_jax.config import PRESETS, ConfigError, RTDetrResNetConfig, RTDetrV2Config  # noqa: E402
from rtdetr_jax.convert.transformers import ConversionError  # noqa: E402
from rtdetr_jax.hub import ModelNotFoundError  # noqa: E402
from rtdetr_jax.model import RTDetrV2ForObjectDetection  # noqa: E402
from rtdetr_jax.modeling.detector import RTDetrV2Detector, RTDetrV2ObjectDetectionOutput  # noqa: E402
from rtdetr_jax.processing import ImageLoadError, RTDetrImageProcessor  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ConfigError",
    "ConversionError",
    "ImageLoadError",
    "ModelNotFoundError",
    "RTDetrImageProcessor",
    "RTDetrResNetConfig",
    "RTDetrV2Config",
    "RTDetrV2Detector",
    "RTDetrV2ForObjectDetection",
    "RTDetrV2ObjectDetectionOutput",
]
