"""`RTDetrImageProcessor`: the same preprocessing and post-processing as transformers' RT-DETR image processor.

Preprocessing: any PIL mode to RGB (alpha composited on white, as transformers does; 16-bit and float images
scaled to 8 bits), EXIF orientation applied, PIL bilinear resize to 640x640, rescale by 1/255, no mean/std
normalisation. Output `pixel_values` is (batch, 3, H, W) float32, the transformers layout.

Post-processing: sigmoid scores, top-k over queries x classes, boxes (cx, cy, w, h) -> absolute (x0, y0, x1, y1).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rtdetr_jax.io_utils import atomic_write_text

PREPROCESSOR_CONFIG = "preprocessor_config.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ImageLoadError(ValueError):
    """An image file is missing, unreadable or not an image."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, so a truncated file fails here with its name."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageLoadError(f"{path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            # 89-178 megapixels: PIL warns (a decompression-bomb guard); such photos are legitimate, and
            # anything larger still fails below with a one-line error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.copy() if not getattr(img, "is_animated", False) else img.convert("RGBA")
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not a readable image file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({err})") from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{path}: image too large to decode safely ({err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited onto white (as transformers' `convert_to_rgb`)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
        else:
            top = 65535.0 if (image.mode.startswith("I;16") or (arr.size and arr.max() > 255)) else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"image array has shape {arr.shape}; expected (H, W), (H, W, 3|4) or (3|4, H, W)")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(f"float image values span [{arr.min():.3g}, {arr.max():.3g}]; expected [0, 1]")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"image array has dtype {arr.dtype}; expected uint8 or float in [0, 1]")
    return Image.fromarray(arr)


class RTDetrImageProcessor:
    """Mirrors transformers' `RTDetrImageProcessor` (defaults: 640x640 bilinear, rescale 1/255, no normalisation)."""

    def __init__(self, do_resize: bool = True, size: dict | None = None, resample: int = Image.BILINEAR,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = False,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 do_convert_rgb: bool = True, exif_transpose: bool = True, **unused: Any):
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 640, "width": 640}
        if not ({"height", "width"} <= set(self.size)):
            raise ValueError(f"size={self.size}: only {{'height': H, 'width': W}} is supported")
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else IMAGENET_MEAN
        self.image_std = list(image_std) if image_std is not None else IMAGENET_STD
        self.do_convert_rgb = do_convert_rgb
        self.exif_transpose = exif_transpose
        self.extra = {k: v for k, v in unused.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ config files
    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            image_processor_type="RTDetrImageProcessor", do_resize=self.do_resize, size=self.size,
            resample=self.resample, do_rescale=self.do_rescale, rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize, image_mean=self.image_mean, image_std=self.image_std,
            do_convert_rgb=self.do_convert_rgb, do_pad=False, format="coco_detection",
        )
        return d

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, PREPROCESSOR_CONFIG), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None) -> "RTDetrImageProcessor":
        from rtdetr_jax.hub import resolve_file

        path = resolve_file(name_or_path, PREPROCESSOR_CONFIG, revision=revision)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if data.get("do_pad"):
            raise ValueError(f"{path}: do_pad=true is not supported (RT-DETR resizes to a fixed size)")
        if data.get("do_convert_rgb") is None:
            data.pop("do_convert_rgb", None)
        return cls(**data)

    # ------------------------------------------------------------------ preprocessing
    def preprocess_one(self, image: Any) -> np.ndarray:
        """One image (PIL, path or array) -> (3, H, W) float32."""
        pil = _as_pil(image)
        if self.exif_transpose:
            pil = ImageOps.exif_transpose(pil)
        if self.do_convert_rgb:
            pil = to_rgb(pil)
        if pil.width < 1 or pil.height < 1:
            raise ValueError(f"image has size {pil.width}x{pil.height}; it must be at least 1x1")
        if self.do_resize:
            pil = pil.resize((self.size["width"], self.size["height"]), resample=self.resample)
        arr = np.asarray(pil)
        arr = arr[..., None] if arr.ndim == 2 else arr
        out = arr.astype(np.float64)
        if self.do_rescale:
            out = out * self.rescale_factor
        if self.do_normalize:
            out = (out - np.asarray(self.image_mean)) / np.asarray(self.image_std)
        return np.ascontiguousarray(out.astype(np.float32).transpose(2, 0, 1))

    def __call__(self, images: Any, return_tensors: str | None = "np", **kwargs: Any) -> dict[str, Any]:
        if return_tensors not in (None, "np", "jax"):
            raise ValueError(f"return_tensors={return_tensors!r}: use 'np' or 'jax'")
        if isinstance(images, (Image.Image, str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("no images given")
        batch = [self.preprocess_one(img) for img in images]
        shapes = {b.shape for b in batch}
        if len(shapes) > 1:
            raise ValueError(f"images preprocess to different shapes {sorted(shapes)}; enable do_resize")
        pixel_values = np.stack(batch)
        if return_tensors == "jax":
            import jax.numpy as jnp

            pixel_values = jnp.asarray(pixel_values)
        return {"pixel_values": pixel_values}

    preprocess = __call__

    # ------------------------------------------------------------------ post-processing
    def post_process_object_detection(self, outputs: Any, threshold: float = 0.5,
                                      target_sizes: Any = None, top_k: int | None = None,
                                      use_focal_loss: bool = True) -> list[dict[str, np.ndarray]]:
        """Raw outputs -> per image `{"scores", "labels", "boxes"}` (boxes absolute xyxy when `target_sizes`).

        Same algorithm as transformers: sigmoid scores, top-k (default: number of queries) over the flattened
        queries x classes, boxes gathered from their query, then `score > threshold`.
        """
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold} must be within [0, 1]")
        logits = np.asarray(outputs["logits"], np.float32)
        boxes = np.asarray(outputs["pred_boxes"], np.float32)
        batch, queries, classes = logits.shape
        cx, cy, w, h = np.moveaxis(boxes, -1, 0)
        xyxy = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
        if target_sizes is not None:
            sizes = np.asarray(target_sizes, np.float32)
            if sizes.shape != (batch, 2):
                raise ValueError(f"target_sizes has shape {sizes.shape}; expected ({batch}, 2) as (height, width)")
            scale = np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], 1)
            xyxy = xyxy * scale[:, None, :]
        k = queries if top_k is None else int(top_k)
        if k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        if use_focal_loss:
            sigmoid = 1.0 / (1.0 + np.exp(-logits.reshape(batch, -1)))  # (batch, queries * classes)
        results = []
        for i in range(batch):
            if use_focal_loss:
                order = top_above(sigmoid[i], k, threshold)
                scores, labels, query = sigmoid[i][order], order % classes, order // classes
            else:
                e = np.exp(logits[i] - logits[i].max(-1, keepdims=True))
                probs = (e / e.sum(-1, keepdims=True))[:, :-1]
                labels, scores = probs.argmax(-1), probs.max(-1)
                query = top_above(scores, k, threshold)
                scores, labels = scores[query], labels[query]
            results.append({"scores": scores, "labels": labels.astype(np.int64), "boxes": xyxy[i][query]})
        return results


def top_above(scores: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """Indices of the scores above `threshold` among the `k` highest of the 1-d `scores`, highest first, ties by
    the lower index: exactly `argsort(-scores, kind="stable")[:k]` with the scores <= threshold dropped.

    Faster than that sort (r18vd's 300 x 80 scores: ~2.2 ms stable-sorted): only the scores above the threshold
    are sorted, and when more than `k` pass, a partition first picks the `k` highest (those tied with the k-th
    highest by their lower index, as the stable sort would)."""
    candidates = np.flatnonzero(scores > threshold)  # ascending indices; NaN never passes
    values = scores[candidates]
    if candidates.size > k:
        kth = np.partition(values, candidates.size - k)[candidates.size - k]  # the k-th highest
        above = values > kth
        tied = np.flatnonzero(values == kth)[: k - int(above.sum())]  # the lowest indices among the ties
        chosen = np.sort(np.concatenate([np.flatnonzero(above), tied]))
        candidates, values = candidates[chosen], values[chosen]
    return candidates[np.argsort(-values, kind="stable")]
