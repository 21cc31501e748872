"""COCO box mAP through pycocotools, the reference implementation of the COCO metric (used by the authors'
`CocoEvaluator`): predictions of the jit eval step -> top-k detections -> `COCOeval`.

pycocotools rather than our own code: AP's interpolation, area ranges and max-detections rules are subtle, and
pycocotools is what published COCO numbers are computed with.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from rtdetr_jax.data.coco import CocoDetection

METRIC_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def detections_from_outputs(logits, pred_boxes, image_ids, sizes, label_to_category_id, top_k: int = 300):
    """COCO result dicts from (batch, queries, classes) logits and (batch, queries, 4) normalised cxcywh boxes.

    Same selection as transformers / the authors' post-processor: sigmoid scores, top-k over queries x classes.
    Rows with image id -1 (filler) are ignored.
    """
    logits = np.asarray(logits, np.float32)
    boxes = np.asarray(pred_boxes, np.float32)
    scores = 1.0 / (1.0 + np.exp(-logits))
    b, q, c = scores.shape
    k = min(top_k, q * c)
    results = []
    for i in range(b):
        if image_ids[i] < 0:
            continue
        flat = scores[i].reshape(-1)
        top = np.argpartition(-flat, k - 1)[:k]
        top = top[np.argsort(-flat[top], kind="stable")]
        query, label = top // c, top % c
        h, w = sizes[i]
        cx, cy, bw, bh = boxes[i, query].T
        x0, y0 = (cx - bw / 2) * w, (cy - bh / 2) * h
        for j in range(k):
            results.append({
                "image_id": int(image_ids[i]),
                "category_id": int(label_to_category_id[label[j]]),
                "bbox": [float(x0[j]), float(y0[j]), float(bw[j] * w), float(bh[j] * h)],
                "score": float(flat[top[j]]),
            })
    return results


def coco_map(dataset: CocoDetection, detections: list[dict]) -> dict[str, float]:
    """AP, AP50, AP75, AP_small/medium/large of `detections` on `dataset`'s annotation file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(dataset.annotation_file)
        if "info" not in gt.dataset:  # loadRes copies it
            gt.dataset["info"] = {}
        if not detections:
            return {name: 0.0 for name in METRIC_NAMES}
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted({d["image_id"] for d in detections} | {im["id"] for im in dataset.images})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(max(v, 0.0)) for name, v in zip(METRIC_NAMES, ev.stats[:6])}


def evaluate(steps, variables, loader, top_k: int = 300, progress=None) -> dict[str, float]:
    """Run `steps.eval_step` with `variables` over `loader` (eval mode) and score with COCO mAP."""
    detections = []
    for batch in loader.epoch(0):
        logits, boxes = steps.eval_step(variables, steps.shard_batch(batch.pixel_values))
        detections += detections_from_outputs(np.asarray(logits), np.asarray(boxes), batch.image_ids,
                                              batch.sizes, loader.dataset.label_to_category_id, top_k)
        if progress is not None:
            progress.update(1)
    return coco_map(loader.dataset, detections)
