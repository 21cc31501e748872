"""RT-DETRv2 training augmentations on PIL images and absolute xyxy boxes, driven by a numpy Generator.

Mirrors the authors' `configs/rtdetrv2/include/dataloader.yml` (torchvision v2 semantics):
RandomPhotometricDistort(p=0.5) -> RandomZoomOut(fill=0) -> RandomIoUCrop(p=0.8) -> SanitizeBoundingBoxes(min_size=1)
-> RandomHorizontalFlip -> Resize(size) -> SanitizeBoundingBoxes(min_size=1) -> float image in [0, 1], boxes as
normalised (cx, cy, w, h). The first three ("strong") are switched off from `stop_epoch` on (the dynamic
augmentation schedule of RT-DETRv2, section 3.3). Every random draw comes from the Generator passed in, so a
sample's augmentation is reproducible from (seed, epoch, index).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

STRONG_OPS = ("photometric_distort", "zoom_out", "iou_crop")


def photometric_distort(image: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    """torchvision `RandomPhotometricDistort`: brightness, contrast (before or after), saturation, hue, channel
    permutation, each applied with probability p."""
    if rng.random() < p:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.875, 1.125))
    contrast_before = rng.random() < 0.5
    contrast = rng.random() < p
    contrast_factor = rng.uniform(0.5, 1.5)
    if contrast and contrast_before:
        image = ImageEnhance.Contrast(image).enhance(contrast_factor)
    if rng.random() < p:
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
    if rng.random() < p:
        shift = rng.uniform(-0.05, 0.05)
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift * 255))) % 256).astype(np.uint8)
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    if contrast and not contrast_before:
        image = ImageEnhance.Contrast(image).enhance(contrast_factor)
    if rng.random() < p:
        image = Image.fromarray(np.asarray(image)[..., rng.permutation(3)])
    return image


def zoom_out(image, boxes, rng, fill: int = 0, side_range=(1.0, 4.0), p: float = 0.5):
    """torchvision `RandomZoomOut`: place the image on a canvas up to 4x larger."""
    if rng.random() >= p:
        return image, boxes
    w, h = image.size
    ratio = rng.uniform(*side_range)
    cw, ch = int(w * ratio), int(h * ratio)
    left = int((cw - w) * rng.random())
    top = int((ch - h) * rng.random())
    canvas = Image.new("RGB", (cw, ch), (fill, fill, fill))
    canvas.paste(image, (left, top))
    return canvas, boxes + np.asarray([left, top, left, top], np.float32)


def _iou_with(boxes, crop):
    lt = np.maximum(boxes[:, :2], crop[:2])
    rb = np.minimum(boxes[:, 2:], crop[2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    crop_area = (crop[2] - crop[0]) * (crop[3] - crop[1])
    return inter / (area + crop_area - inter)


def iou_crop(image, boxes, labels, rng, p: float = 0.8, min_scale=0.3, max_scale=1.0, min_aspect=0.5,
             max_aspect=2.0, options=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), trials: int = 40, rounds: int = 50):
    """torchvision `RandomIoUCrop` (SSD): a crop whose IoU with some box reaches a sampled minimum; boxes whose
    centre leaves the crop are dropped. Applied with probability p (the authors' wrapper)."""
    if rng.random() >= p or len(boxes) == 0:
        return image, boxes, labels
    w, h = image.size
    for _ in range(rounds):
        min_iou = options[int(rng.integers(len(options)))]
        if min_iou >= 1.0:
            return image, boxes, labels
        for _ in range(trials):
            r = min_scale + (max_scale - min_scale) * rng.random(2)
            nw, nh = int(w * r[0]), int(h * r[1])
            if nh == 0 or not min_aspect <= nw / nh <= max_aspect:
                continue
            r = rng.random(2)
            left, top = int((w - nw) * r[0]), int((h - nh) * r[1])
            right, bottom = left + nw, top + nh
            if left == right or top == bottom:
                continue
            cx = (boxes[:, 0] + boxes[:, 2]) / 2
            cy = (boxes[:, 1] + boxes[:, 3]) / 2
            inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
            if not inside.any():
                continue
            crop = np.asarray([left, top, right, bottom], np.float32)
            if _iou_with(boxes[inside], crop).max() < min_iou:
                continue
            kept = boxes[inside] - np.asarray([left, top, left, top], np.float32)
            kept = np.clip(kept, 0, [nw, nh, nw, nh]).astype(np.float32)
            return image.crop((left, top, right, bottom)), kept, labels[inside]
    return image, boxes, labels


def sanitize(boxes, labels, min_size: float = 1.0):
    """torchvision `SanitizeBoundingBoxes`: drop boxes narrower or shorter than `min_size` pixels."""
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return boxes[keep], labels[keep]


def horizontal_flip(image, boxes, rng, p: float = 0.5):
    if rng.random() >= p:
        return image, boxes
    w = image.size[0]
    flipped = boxes.copy()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image.transpose(Image.FLIP_LEFT_RIGHT), flipped


def resize(image, boxes, size: int):
    """Resize to size x size (aspect not kept, as the authors' `Resize([640, 640])`), bilinear like the processor."""
    w, h = image.size
    scale = np.asarray([size / w, size / h, size / w, size / h], np.float32)
    return image.resize((size, size), Image.BILINEAR), boxes * scale


def to_model_inputs(image, boxes, size: int):
    """-> (3, size, size) float32 in [0, 1] and boxes as normalised (cx, cy, w, h)."""
    pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    x0, y0, x1, y1 = boxes.T
    cxcywh = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1) / size
    return pixels, cxcywh.astype(np.float32).reshape(-1, 4)


def train_transform(image, boxes, labels, size: int, rng: np.random.Generator, strong: bool = True):
    """The full training pipeline for one sample; `strong=False` after the stop epoch."""
    if strong:
        image = photometric_distort(image, rng)
        image, boxes = zoom_out(image, boxes, rng)
        image, boxes, labels = iou_crop(image, boxes, labels, rng)
        boxes, labels = sanitize(boxes, labels)
    image, boxes = horizontal_flip(image, boxes, rng)
    image, boxes = resize(image, boxes, size)
    boxes, labels = sanitize(boxes, labels)
    pixels, cxcywh = to_model_inputs(image, boxes, size)
    return pixels, cxcywh, labels


def eval_transform(image, boxes, labels, size: int):
    image, boxes = resize(image, boxes, size)
    pixels, cxcywh = to_model_inputs(image, boxes, size)
    return pixels, cxcywh, labels
