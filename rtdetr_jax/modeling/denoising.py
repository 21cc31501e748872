"""Contrastive denoising queries for training (DINO, Zhang et al. arXiv 2203.03605; RT-DETR section 4).

Each ground-truth box yields a positive query (small box noise, to be reconstructed) and a negative one (larger
noise, to be classified as background), repeated in groups. Reference: transformers
`get_contrastive_denoising_training_group`, whose layout depends on the batch's largest box count `m`: groups of
`2 m` slots (m positives then m negatives), `num_denoising // m` groups (at least 1).

Here shapes are static: there are always `num_denoising_slots(...)` slots, enough for any `m`; the first
`2 m * groups` follow transformers' layout exactly, the rest are padding queries that no other query sees and that
carry no loss. So with the same noise the decoder outputs for real queries are identical to transformers'.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from rtdetr_jax.modeling.decoder import inverse_sigmoid
from rtdetr_jax.ops.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh


@flax.struct.dataclass
class DenoisingQueries:
    """Denoising inputs to the decoder and what the loss needs to score them.

    labels: (batch, slots) int32 class id per slot (num_classes for padding, the extra embedding row).
    boxes_unact: (batch, slots, 4) noisy boxes in logit space.
    attention_mask: (slots + queries, slots + queries) bool, True where a query may attend (shared by the batch).
    slot_gt: (batch, slots) int32 ground-truth slot each query reconstructs.
    slot_positive: (batch, slots) bool, positive queries of real boxes: the pairs the denoising loss scores.
    slot_in_use: (slots,) bool, the slots of transformers' layout (the rest are padding with no loss at all).
    num_groups: () int32 number of groups in use (transformers' `dn_num_group`).
    """

    labels: Any
    boxes_unact: Any
    attention_mask: Any
    slot_gt: Any
    slot_positive: Any
    slot_in_use: Any
    num_groups: Any

    @property
    def num_slots(self) -> int:
        return self.labels.shape[1]


def num_denoising_slots(num_denoising: int, max_boxes: int) -> int:
    """Static slot count: `2 m * max(num_denoising // m, 1)` is at most this for every m in [1, max_boxes]."""
    return 2 * max(num_denoising, max_boxes)


def attention_mask(group_id, num_queries: int):
    """(slots + queries, slots + queries) bool: matching queries see only matching queries; a denoising query
    sees its own group and the matching queries."""
    slots = group_id.shape[0]
    is_dn = jnp.arange(slots + num_queries) < slots
    gid = jnp.concatenate([group_id, jnp.full((num_queries,), -1, group_id.dtype)])
    same_group = gid[:, None] == gid[None, :]
    return jnp.where(is_dn[:, None], same_group | ~is_dn[None, :], ~is_dn[None, :])


def layout(gt_mask, num_denoising: int, num_slots: int):
    """Slot layout for a batch: which box each slot copies, whether it is negative, and the group ids.

    Args:
      gt_mask: (batch, max_boxes) bool.
    Returns:
      slot_gt (batch, slots) int32 original box slot, slot_real (batch, slots) bool (copies a real box),
      negative (slots,) bool, group_id (slots,) int32 (padding slots get unique ids), num_groups () int32,
      in_use (slots,) bool.
    """
    counts = jnp.sum(gt_mask, axis=1).astype(jnp.int32)  # (batch,)
    m = jnp.max(counts)
    m_safe = jnp.maximum(m, 1)
    num_groups = jnp.where(m > 0, jnp.maximum(num_denoising // m_safe, 1), 0).astype(jnp.int32)
    used = 2 * m * num_groups
    s = jnp.arange(num_slots, dtype=jnp.int32)
    r = s % (2 * m_safe)
    compact = r % m_safe  # index among the image's real boxes
    negative = r >= m_safe
    in_use = s < used
    group_id = jnp.where(in_use, s // (2 * m_safe), num_slots + s)
    # real boxes first, in their original order (transformers takes each image's boxes in order)
    order = jnp.argsort(~gt_mask, axis=1, stable=True)  # (batch, max_boxes)
    slot_gt = jnp.take_along_axis(order, jnp.broadcast_to(compact, (gt_mask.shape[0], num_slots)), axis=1)
    slot_real = in_use[None, :] & (compact[None, :] < counts[:, None])
    return slot_gt.astype(jnp.int32), slot_real, negative, group_id, num_groups, in_use


def contrastive_denoising_group(key, gt_labels, gt_boxes, gt_mask, *, num_classes: int, num_queries: int,
                                num_denoising: int, label_noise_ratio: float, box_noise_scale: float):
    """Noisy label and box queries for one batch (static shapes; `jax.random` noise).

    Args:
      key: PRNG key.
      gt_labels: (batch, max_boxes) int; gt_boxes: (batch, max_boxes, 4) normalised cxcywh; gt_mask: (batch, max_boxes).
    Returns:
      `DenoisingQueries`, or None when `num_denoising <= 0`.
    """
    if num_denoising <= 0:
        return None
    batch, max_boxes = gt_mask.shape
    num_slots = num_denoising_slots(num_denoising, max_boxes)
    slot_gt, slot_real, negative, group_id, num_groups, in_use = layout(gt_mask, num_denoising, num_slots)
    labels = jnp.where(slot_real, jnp.take_along_axis(gt_labels, slot_gt, axis=1), num_classes).astype(jnp.int32)
    boxes = jnp.where(slot_real[..., None], jnp.take_along_axis(gt_boxes, slot_gt[..., None], axis=1), 0.0)
    boxes = boxes.astype(jnp.float32)

    k_flip, k_label, k_sign, k_part = jax.random.split(key, 4)
    if label_noise_ratio > 0:
        flip = jax.random.uniform(k_flip, labels.shape) < label_noise_ratio * 0.5
        new_label = jax.random.randint(k_label, labels.shape, 0, num_classes, dtype=jnp.int32)
        labels = jnp.where(flip & slot_real, new_label, labels)
    if box_noise_scale > 0:
        corners = cxcywh_to_xyxy(boxes)
        diff = jnp.tile(boxes[..., 2:] * 0.5, (1, 1, 2)) * box_noise_scale
        sign = jax.random.randint(k_sign, boxes.shape, 0, 2).astype(boxes.dtype) * 2.0 - 1.0
        part = jax.random.uniform(k_part, boxes.shape, boxes.dtype)
        neg = negative[None, :, None].astype(boxes.dtype)
        part = ((part + 1.0) * neg + part * (1 - neg)) * sign
        corners = jnp.clip(corners + part * diff, 0.0, 1.0)
        boxes = xyxy_to_cxcywh(corners)
    return DenoisingQueries(
        labels=labels,
        boxes_unact=inverse_sigmoid(boxes),
        attention_mask=attention_mask(group_id, num_queries),
        slot_gt=slot_gt,
        slot_positive=slot_real & ~negative[None, :],
        slot_in_use=in_use,
        num_groups=num_groups,
    )
