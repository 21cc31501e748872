"""RT-DETR(v2) training loss: varifocal classification, L1 and GIoU box terms, for the last decoder layer, every
earlier decoder layer, the encoder's top-k proposals and the denoising queries.

A pure function of arrays with static shapes, so it runs inside `jax.grad` and `jit`. It reproduces transformers'
`RTDetrLoss` / `RTDetrForObjectDetectionLoss` term by term (same names in `loss_dict`, same weights, same
normalisation by the number of boxes), with ground truth padded to `max_boxes` per image plus a mask.
Reference: Zhao et al. arXiv 2304.08069 (varifocal loss with IoU-aware targets); transformers `loss_rt_detr.py`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.loss.matcher import hungarian_matcher
from rtdetr_jax.ops.boxes import cxcywh_to_xyxy, elementwise_generalized_iou, elementwise_iou

SAFE_BOX = (0.5, 0.5, 0.5, 0.5)  # stands in for padding so that IoU maths never sees a zero-area box


@flax.struct.dataclass
class Targets:
    """Ground truth padded to a fixed number of boxes per image.

    labels: (batch, max_boxes) int32 class ids; boxes: (batch, max_boxes, 4) normalised (cx, cy, w, h);
    mask: (batch, max_boxes) bool, True for real boxes.
    """

    labels: Any
    boxes: Any
    mask: Any

    @property
    def max_boxes(self) -> int:
        return self.labels.shape[1]


def pad_targets(labels: list[dict], max_boxes: int | None = None) -> Targets:
    """transformers-style `[{"class_labels": (n,), "boxes": (n, 4)}, ...]` -> padded `Targets` (numpy)."""
    counts = [len(np.asarray(t["class_labels"])) for t in labels]
    if max_boxes is None:
        max_boxes = max(max(counts, default=0), 1)
    if max(counts, default=0) > max_boxes:
        raise ValueError(f"an image has {max(counts)} boxes, more than max_boxes={max_boxes}")
    out_labels = np.zeros((len(labels), max_boxes), np.int32)
    out_boxes = np.tile(np.asarray(SAFE_BOX, np.float32), (len(labels), max_boxes, 1))
    mask = np.zeros((len(labels), max_boxes), bool)
    for i, (t, n) in enumerate(zip(labels, counts)):
        boxes = np.asarray(t["boxes"], np.float32).reshape(-1, 4)
        if len(boxes) != n:
            raise ValueError(f"labels[{i}] has {n} class_labels but {len(boxes)} boxes")
        out_labels[i, :n] = np.asarray(t["class_labels"])
        out_boxes[i, :n] = boxes
        mask[i, :n] = True
    return Targets(out_labels, out_boxes, mask)


def _sigmoid_bce_with_logits(x, t):
    return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def pair_losses(logits, pred_boxes, query_index, gt_index, pair_mask, targets: Targets, num_boxes, config,
                query_mask=None):
    """The weighted `loss_vfl`, `loss_bbox`, `loss_giou` of one prediction set given matched pairs.

    Args:
      logits: (batch, queries, classes); pred_boxes: (batch, queries, 4) normalised cxcywh.
      query_index, gt_index, pair_mask: (batch, pairs) which query is paired with which ground-truth slot.
      num_boxes: () normaliser.
      query_mask: optional (queries,) bool; queries outside it add nothing to the classification term.
    """
    batch, num_queries, num_classes = logits.shape
    dtype = logits.dtype
    valid = pair_mask & (query_index >= 0)
    q = jnp.where(valid, query_index, 0)
    g = jnp.where(valid, gt_index, 0)
    safe = jnp.asarray(SAFE_BOX, pred_boxes.dtype)
    src = jnp.take_along_axis(pred_boxes, q[..., None], axis=1)  # (batch, pairs, 4)
    src = jnp.where(valid[..., None], src, safe)
    tgt = jnp.take_along_axis(targets.boxes, g[..., None], axis=1).astype(pred_boxes.dtype)
    tgt = jnp.where(valid[..., None], tgt, safe)
    tgt_label = jnp.take_along_axis(targets.labels, g, axis=1)
    w = valid.astype(pred_boxes.dtype)

    loss_bbox = jnp.sum(jnp.abs(src - tgt) * w[..., None]) / num_boxes
    giou = elementwise_generalized_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))
    loss_giou = jnp.sum((1 - giou) * w) / num_boxes

    # varifocal: target score is the IoU of the matched box at its class, 0 elsewhere
    iou, _ = elementwise_iou(cxcywh_to_xyxy(jax.lax.stop_gradient(src)), cxcywh_to_xyxy(tgt))
    b = jnp.broadcast_to(jnp.arange(batch)[:, None], q.shape)
    q_scatter = jnp.where(valid, q, num_queries)  # out of range: dropped
    onehot = jnp.zeros((batch, num_queries, num_classes), dtype).at[b, q_scatter, tgt_label].set(1, mode="drop")
    score = jnp.zeros((batch, num_queries, num_classes), dtype).at[b, q_scatter, tgt_label].set(
        iou.astype(dtype), mode="drop"
    )
    pred_score = jax.nn.sigmoid(jax.lax.stop_gradient(logits))
    weight = config.focal_loss_alpha * pred_score**config.focal_loss_gamma * (1 - onehot) + score
    vfl = weight * _sigmoid_bce_with_logits(logits, score)  # (batch, queries, classes)
    if query_mask is not None:
        vfl = vfl * query_mask[None, :, None].astype(dtype)
    loss_vfl = jnp.sum(vfl) / num_boxes
    return {
        "loss_vfl": config.weight_loss_vfl * loss_vfl,
        "loss_bbox": config.weight_loss_bbox * loss_bbox,
        "loss_giou": config.weight_loss_giou * loss_giou,
    }


def _matched_losses(logits, pred_boxes, targets: Targets, num_boxes, config):
    match = hungarian_matcher(logits, pred_boxes, targets.labels, targets.boxes, targets.mask, config)
    gt_index = jnp.broadcast_to(jnp.arange(targets.max_boxes), match.shape)
    return pair_losses(logits, pred_boxes, match, gt_index, targets.mask, targets, num_boxes, config)


def rtdetr_loss(outputs, targets: Targets, config):
    """Total loss and named terms, like transformers' `RTDetrForObjectDetectionLoss`.

    Args:
      outputs: `RTDetrV2ObjectDetectionOutput` (with `dn_*` fields when trained with denoising).
      targets: `Targets`.
      config: `RTDetrV2Config`.
    Returns:
      (loss, loss_dict): keys `loss_vfl`, `loss_bbox`, `loss_giou`, then `_aux_{i}` for decoder layers
      0..L-2 and `_aux_{L-1}` for the encoder proposals, then `_dn_{i}` for each decoder layer.
    """
    mask = targets.mask
    num_boxes = jnp.maximum(jnp.sum(mask).astype(outputs.logits.dtype), 1.0)
    losses = dict(_matched_losses(outputs.logits, outputs.pred_boxes, targets, num_boxes, config))
    if config.auxiliary_loss:
        # earlier decoder layers, then the encoder's proposals: one vmapped matcher + loss over the stack
        layers = outputs.intermediate_logits.shape[1]
        aux_logits = jnp.concatenate([jnp.moveaxis(outputs.intermediate_logits[:, :-1], 1, 0),
                                      outputs.enc_topk_logits[None].astype(outputs.logits.dtype)])
        aux_boxes = jnp.concatenate([jnp.moveaxis(outputs.intermediate_reference_points[:, :-1], 1, 0),
                                     outputs.enc_topk_bboxes[None].astype(outputs.pred_boxes.dtype)])
        aux = jax.vmap(lambda lg, bx: _matched_losses(lg, bx, targets, num_boxes, config))(aux_logits, aux_boxes)
        for i in range(layers):
            for k, v in aux.items():
                losses[f"{k}_aux_{i}"] = v[i]
        dn = outputs.denoising
        if dn is not None:
            dn_num_boxes = jnp.maximum(num_boxes * dn.num_groups, 1.0)
            slots = jnp.broadcast_to(jnp.arange(dn.num_slots), dn.slot_gt.shape)
            dn_terms = jax.vmap(
                lambda lg, bx: pair_losses(lg, bx, slots, dn.slot_gt, dn.slot_positive, targets, dn_num_boxes,
                                           config, dn.slot_in_use)
            )(jnp.moveaxis(outputs.dn_intermediate_logits, 1, 0),
              jnp.moveaxis(outputs.dn_intermediate_reference_points, 1, 0))
            for i in range(outputs.dn_intermediate_logits.shape[1]):
                for k, v in dn_terms.items():
                    losses[f"{k}_dn_{i}"] = v[i]
    loss = sum(losses.values())
    return loss, losses
