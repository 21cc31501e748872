"""Box conversions, IoU and generalized IoU (Rezatofighi et al., CVPR 2019) as pure jnp functions.

Boxes are `(..., 4)` arrays, either normalised centre form `(cx, cy, w, h)` or corner form `(x0, y0, x1, y1)`.
Pairwise functions take `(N, 4)` and `(M, 4)` (with optional leading batch axes) and return `(..., N, M)`;
elementwise functions take two arrays of the same shape and return `(...)`.
Reference: transformers `loss_for_object_detection.box_iou` / `generalized_box_iou`.
"""

from __future__ import annotations

import jax.numpy as jnp


def cxcywh_to_xyxy(boxes):
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
    """Area of corner-form boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1, boxes2):
    """IoU and union of every pair of corner-form boxes: (..., N, 4), (..., M, 4) -> two (..., N, M)."""
    area1 = box_area(boxes1)[..., :, None]
    area2 = box_area(boxes2)[..., None, :]
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    return inter / union, union


def pairwise_generalized_iou(boxes1, boxes2):
    """GIoU of every pair of corner-form boxes: (..., N, 4), (..., M, 4) -> (..., N, M)."""
    iou, union = pairwise_iou(boxes1, boxes2)
    lt = jnp.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = jnp.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def elementwise_iou(boxes1, boxes2):
    """IoU of matching rows of two corner-form arrays of the same shape (..., 4) -> (...)."""
    lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union, union


def elementwise_generalized_iou(boxes1, boxes2):
    """GIoU of matching rows of two corner-form arrays of the same shape (..., 4) -> (...)."""
    iou, union = elementwise_iou(boxes1, boxes2)
    lt = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = jnp.clip(rb - lt, 0.0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing
