"""Hungarian matching of predictions to padded ground truth, entirely in JAX (no host callback).

`linear_sum_assignment` solves the rectangular assignment problem with the shortest-augmenting-path algorithm
(Jonker & Volgenant 1987; the O(n^2 m) potentials form, Kuhn-Munkres): one augmentation per row, each a
Dijkstra-like sweep over the columns done as vector operations inside `lax.while_loop`. Shapes are static, so it
compiles once and runs under `jit`/`vmap` on CPU, GPU and TPU. When the optimum is unique it returns the same
assignment as `scipy.optimize.linear_sum_assignment` (tested on random matrices).

`matching_cost` is transformers' `RTDetrHungarianMatcher` cost: focal class cost, L1 and GIoU box costs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtdetr_jax.ops.boxes import cxcywh_to_xyxy, pairwise_generalized_iou

# Non-finite costs become this large finite value: such pairs are matched only when nothing else is left
# (transformers uses the dtype's max, which would overflow the potentials here).
NONFINITE_COST = 1e8


def _assign_rows(cost, num_rows):
    """Optimal assignment of rows `[0, num_rows)` of `cost` (R, C), R <= C, each to a distinct column.

    Returns (R,) int32: the column of each row, -1 for rows at or past `num_rows`.
    """
    n_rows, n_cols = cost.shape
    dtype = cost.dtype
    inf = jnp.array(jnp.inf, dtype)
    # 1-based with a dummy row and column 0, as in the classic formulation
    a = jnp.pad(cost, ((1, 0), (1, 0)))  # (R + 1, C + 1)
    u = jnp.zeros((n_rows + 1,), dtype)  # row potentials
    v = jnp.zeros((n_cols + 1,), dtype)  # column potentials
    p = jnp.zeros((n_cols + 1,), jnp.int32)  # p[j]: row assigned to column j (0: none)
    way = jnp.zeros((n_cols + 1,), jnp.int32)  # previous column on the alternating path
    col_ids = jnp.arange(n_cols + 1, dtype=jnp.int32)

    def add_row(i, state):
        u, v, p, way = state
        p = p.at[0].set(i)
        minv = jnp.full((n_cols + 1,), inf)
        used = jnp.zeros((n_cols + 1,), bool)

        def grow(s):
            u, v, p, way, minv, used, j0 = s
            used = used.at[j0].set(True)
            i0 = p[j0]
            reduced = a[i0] - u[i0] - v  # (C + 1,)
            better = (~used) & (reduced < minv)
            minv = jnp.where(better, reduced, minv)
            way = jnp.where(better, j0, way)
            candidates = jnp.where(used, inf, minv)
            j1 = jnp.argmin(candidates).astype(jnp.int32)
            delta = candidates[j1]
            # columns on the tree: their rows' potentials rise, their own fall; the others' slack shrinks
            u = u.at[p].add(jnp.where(used, delta, 0))  # used columns hold distinct rows
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return u, v, p, way, minv, used, j1

        u, v, p, way, _, _, j0 = jax.lax.while_loop(
            lambda s: s[2][s[6]] != 0, grow, (u, v, p, way, minv, used, jnp.int32(0))
        )

        def augment(s):
            p, j0 = s
            j1 = way[j0]
            return p.at[j0].set(p[j1]), j1

        p, _ = jax.lax.while_loop(lambda s: s[1] != 0, augment, (p, j0))
        return u, v, p, way

    _, _, p, _ = jax.lax.fori_loop(1, num_rows + 1, add_row, (u, v, p, way))
    # invert p (column -> row) into row -> column; unassigned columns write to the dummy row 0
    col_of_row = jnp.zeros((n_rows + 1,), jnp.int32).at[p[1:]].set(col_ids[1:])
    col_of_row = col_of_row[1:] - 1
    return jnp.where(jnp.arange(n_rows) < num_rows, col_of_row, -1)


def _finite(cost):
    return jnp.where(jnp.isfinite(cost), cost, jnp.asarray(NONFINITE_COST, cost.dtype))


def linear_sum_assignment(cost):
    """Minimum-cost assignment of a dense (N, M) cost matrix, like `scipy.optimize.linear_sum_assignment`.

    Returns `(row_ind, col_ind)`, each of length min(N, M), with `row_ind` increasing.
    """
    cost = _finite(jnp.asarray(cost))
    n, m = cost.shape
    if n <= m:
        return jnp.arange(n, dtype=jnp.int32), _assign_rows(cost, n)
    cols = jnp.arange(m, dtype=jnp.int32)
    rows = _assign_rows(cost.T, m)  # (M,): the row of each column
    order = jnp.argsort(rows)
    return rows[order], cols[order]


def match_ground_truth(cost, gt_mask):
    """Assign each valid ground-truth box of one image to a distinct query.

    Args:
      cost: (queries, max_boxes) matching cost.
      gt_mask: (max_boxes,) bool, which ground-truth slots are real (anywhere in the row).
    Returns:
      (max_boxes,) int32: the query matched to each ground-truth slot, -1 for padding.
    """
    num_queries, max_boxes = cost.shape
    if max_boxes > num_queries:
        raise ValueError(f"max_boxes={max_boxes} exceeds num_queries={num_queries}; every box needs its own query")
    # valid slots first (stable), so that the solver's rows [0, n) are exactly the real boxes
    order = jnp.argsort(~gt_mask, stable=True)
    num_valid = jnp.sum(gt_mask).astype(jnp.int32)
    query_of_sorted = _assign_rows(_finite(cost.T[order]), num_valid)  # (max_boxes,)
    return jnp.zeros((max_boxes,), jnp.int32).at[order].set(query_of_sorted)


def matching_cost(logits, pred_boxes, gt_labels, gt_boxes, *, class_cost, bbox_cost, giou_cost, alpha, gamma,
                  use_focal_loss=True):
    """transformers' `RTDetrHungarianMatcher` cost for one image.

    Args:
      logits: (queries, classes); pred_boxes: (queries, 4) normalised cxcywh.
      gt_labels: (max_boxes,) int; gt_boxes: (max_boxes, 4) normalised cxcywh (padding rows must be valid boxes).
    Returns:
      (queries, max_boxes) cost.
    """
    if use_focal_loss:
        prob = jax.nn.sigmoid(logits)[:, gt_labels]  # (queries, max_boxes)
        neg = (1 - alpha) * prob**gamma * -jnp.log(1 - prob + 1e-8)
        pos = alpha * (1 - prob) ** gamma * -jnp.log(prob + 1e-8)
        cls = pos - neg
    else:
        cls = -jax.nn.softmax(logits, axis=-1)[:, gt_labels]
    l1 = jnp.sum(jnp.abs(pred_boxes[:, None, :] - gt_boxes[None, :, :]), axis=-1)
    giou = -pairwise_generalized_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(gt_boxes))
    return bbox_cost * l1 + class_cost * cls + giou_cost * giou


def hungarian_matcher(logits, pred_boxes, gt_labels, gt_boxes, gt_mask, config):
    """Batched matching under `jit`.

    Args:
      logits: (batch, queries, classes); pred_boxes: (batch, queries, 4).
      gt_labels: (batch, max_boxes); gt_boxes: (batch, max_boxes, 4); gt_mask: (batch, max_boxes) bool.
      config: an `RTDetrV2Config` (matcher_* fields, use_focal_loss).
    Returns:
      (batch, max_boxes) int32 matched query per ground-truth slot, -1 for padding. No gradient flows.
    """
    if not (config.matcher_class_cost or config.matcher_bbox_cost or config.matcher_giou_cost):
        raise ValueError("All costs of the matcher can't be 0")
    logits, pred_boxes = jax.lax.stop_gradient((logits, pred_boxes))
    cost = jax.vmap(
        lambda lg, pb, gl, gb: matching_cost(
            lg, pb, gl, gb,
            class_cost=config.matcher_class_cost,
            bbox_cost=config.matcher_bbox_cost,
            giou_cost=config.matcher_giou_cost,
            alpha=config.matcher_alpha,
            gamma=config.matcher_gamma,
            use_focal_loss=config.use_focal_loss,
        )
    )(logits, pred_boxes, gt_labels, gt_boxes)
    return jax.vmap(match_ground_truth)(cost, gt_mask)
