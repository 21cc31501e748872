"""rtdetr-jax: RT-DETRv2 (arXiv 2407.17140) in JAX/Flax, with transformers' API and numerical parity."""

from rtdetr_jax.config import PRESETS, ConfigError, RTDetrResNetConfig, RTDetrV2Config
from rtdetr_jax.convert.transformers import ConversionError
from rtdetr_jax.hub import ModelNotFoundError
from rtdetr_jax.model import RTDetrV2ForObjectDetection
from rtdetr_jax.modeling.detector import RTDetrV2Detector, RTDetrV2ObjectDetectionOutput
from rtdetr_jax.processing import ImageLoadError, RTDetrImageProcessor

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
