"""JAX Hungarian matching vs `scipy.optimize.linear_sum_assignment`, and the batched padded matcher."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.loss.matcher import hungarian_matcher, linear_sum_assignment, match_ground_truth, matching_cost


def test_random_matrices_match_scipy():
    """Square, wide and tall matrices at several scales; continuous costs make the optimum unique."""
    rng = np.random.default_rng(0)
    solve = jax.jit(jax.vmap(linear_sum_assignment))
    for n, m in [(1, 1), (1, 8), (8, 1), (4, 4), (5, 11), (11, 5), (12, 12), (3, 40)]:
        scales = rng.choice([0.01, 1.0, 1000.0], size=(60, 1, 1))
        costs = (rng.normal(size=(60, n, m)) * scales).astype(np.float32)
        rows, cols = solve(costs)
        for i, cost in enumerate(costs):
            ref_rows, ref_cols = scipy_lsa(cost.astype(np.float64))
            assert np.array_equal(rows[i], ref_rows) and np.array_equal(cols[i], ref_cols), (n, m, cost)


def test_detection_sized_padded_batch_matches_scipy():
    """300 queries x up to 100 boxes, boxes padded anywhere in the row, one fully padded image."""
    rng = np.random.default_rng(1)
    batch, queries, max_boxes = 4, 300, 100
    cost = rng.random((batch, queries, max_boxes)).astype(np.float32)
    mask = np.zeros((batch, max_boxes), bool)
    mask[0] = True
    mask[1, rng.choice(max_boxes, 37, replace=False)] = True
    mask[3, [5, 99]] = True  # image 2 has no boxes
    match = np.asarray(jax.jit(jax.vmap(match_ground_truth))(cost, mask))
    for b in range(batch):
        valid = np.nonzero(mask[b])[0]
        assert np.all(match[b, ~mask[b]] == -1)
        if len(valid) == 0:
            continue
        q, g = scipy_lsa(cost[b][:, valid].astype(np.float64))
        expected = np.full(len(valid), -1)
        expected[g] = q
        assert np.array_equal(match[b, valid], expected)
        assert len(set(match[b, valid].tolist())) == len(valid)


def test_nonfinite_costs_are_matched_last():
    cost = np.array([[np.nan, 1.0], [2.0, np.inf], [0.5, 3.0]], np.float32)
    rows, cols = linear_sum_assignment(cost)
    # the finite optimum: row 2 -> col 0 (0.5), row 0 -> col 1 (1.0)
    assert dict(zip(np.asarray(rows).tolist(), np.asarray(cols).tolist())) == {0: 1, 2: 0}


def test_too_many_boxes_is_a_clear_error():
    with pytest.raises(ValueError, match="max_boxes=5 exceeds num_queries=3"):
        match_ground_truth(jnp.zeros((3, 5)), jnp.ones((5,), bool))


def test_matching_cost_equals_transformers_matcher():
    torch = pytest.importorskip("torch")
    from transformers import RTDetrV2Config as HFConfig
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 30, 7)).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (2, 30, 2)), rng.uniform(0.05, 0.3, (2, 30, 2))], -1)
    boxes = boxes.astype(np.float32)
    counts = [4, 6]
    targets = []
    for n in counts:
        tb = np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.3, (n, 2))], -1).astype(np.float32)
        targets.append({"class_labels": torch.as_tensor(rng.integers(0, 7, n)), "boxes": torch.as_tensor(tb)})
    hf_config = HFConfig(num_labels=7)
    indices = RTDetrHungarianMatcher(hf_config)(
        {"logits": torch.as_tensor(logits), "pred_boxes": torch.as_tensor(boxes)}, targets
    )
    gt_labels = np.zeros((2, 6), np.int32)
    gt_boxes = np.full((2, 6, 4), 0.5, np.float32)
    mask = np.zeros((2, 6), bool)
    for i, t in enumerate(targets):
        gt_labels[i, : counts[i]] = t["class_labels"].numpy()
        gt_boxes[i, : counts[i]] = t["boxes"].numpy()
        mask[i, : counts[i]] = True
    config = RTDetrV2Config(id2label={i: str(i) for i in range(7)})
    match = np.asarray(hungarian_matcher(logits, boxes, gt_labels, gt_boxes, mask, config))
    for i, (q, g) in enumerate(indices):
        expected = np.full(counts[i], -1)
        expected[g.numpy()] = q.numpy()
        assert np.array_equal(match[i, : counts[i]], expected)

    cost = matching_cost(logits[0], boxes[0], gt_labels[0], gt_boxes[0], class_cost=2.0, bbox_cost=5.0,
                         giou_cost=2.0, alpha=0.25, gamma=2.0)
    assert cost.shape == (30, 6) and np.all(np.isfinite(cost))
