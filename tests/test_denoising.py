"""Contrastive denoising queries: static shapes for any box count, transformers' layout, noise statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.modeling.denoising import contrastive_denoising_group, num_denoising_slots


def make(mask, key=0, num_denoising=10, label_noise_ratio=0.5, box_noise_scale=1.0):
    batch, max_boxes = mask.shape
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (batch, max_boxes)).astype(np.int32)
    boxes = np.concatenate([rng.uniform(0.3, 0.7, (batch, max_boxes, 2)), rng.uniform(0.1, 0.3, (batch, max_boxes, 2))],
                           -1).astype(np.float32)
    fn = jax.jit(lambda k, lb, bx, m: contrastive_denoising_group(
        k, lb, bx, m, num_classes=4, num_queries=7, num_denoising=num_denoising,
        label_noise_ratio=label_noise_ratio, box_noise_scale=box_noise_scale))
    return fn(jax.random.PRNGKey(key), labels, boxes, mask), labels, boxes


def test_shapes_are_static_and_layout_follows_box_count():
    slots = num_denoising_slots(10, 6)
    for counts in [(0, 0), (1, 0), (3, 2), (6, 6)]:
        mask = np.zeros((2, 6), bool)
        for i, n in enumerate(counts):
            mask[i, :n] = True
        q, _, _ = make(mask)
        assert q.labels.shape == (2, slots) and q.attention_mask.shape == (slots + 7, slots + 7)
        m = max(counts)
        groups = max(10 // m, 1) if m else 0
        assert int(q.num_groups) == groups
        assert int(np.sum(q.slot_in_use)) == 2 * m * groups
        # each real box has one positive per group
        for i, n in enumerate(counts):
            assert int(np.sum(q.slot_positive[i])) == n * groups
        # padding slots carry the padding class
        assert np.all(np.asarray(q.labels)[:, ~np.asarray(q.slot_in_use)] == 4)


def test_attention_mask_blocks_groups_and_hides_denoising_from_matching_queries():
    mask = np.ones((1, 2), bool)
    q, _, _ = make(mask, num_denoising=4)  # m = 2 -> 2 groups of 4 slots, 8 in use
    att = np.asarray(q.attention_mask)
    slots = q.num_slots
    assert not att[slots:, :slots].any()  # matching queries never see denoising ones
    assert att[slots:, slots:].all() and att[:slots, slots:].all()
    assert att[0:4, 0:4].all() and not att[0:4, 4:slots].any()
    assert att[4:8, 4:8].all() and not att[4:8, :4].any()
    pad = np.arange(8, slots)
    assert np.array_equal(att[np.ix_(pad, np.arange(slots))], np.eye(slots, dtype=bool)[pad])


def test_noise_keeps_positives_close_and_pushes_negatives_out():
    mask = np.ones((8, 6), bool)
    q, labels, boxes = make(mask, num_denoising=60, label_noise_ratio=0.0)
    in_use = np.asarray(q.slot_in_use)
    noisy = jax.nn.sigmoid(q.boxes_unact)
    gt = np.take_along_axis(boxes, np.asarray(q.slot_gt)[..., None], 1)
    # box noise is at most half the box size on each corner for positives, and 1-2x that for negatives
    err = np.abs(np.asarray(noisy) - gt)[..., :2].max(-1)
    pos = np.asarray(q.slot_positive)
    neg = in_use[None] & ~pos
    assert err[pos].max() <= 0.5 * gt[..., 2:].max() + 1e-5
    assert err[neg].mean() > err[pos].mean()
    # no label noise asked: labels are the boxes' own
    gl = np.take_along_axis(labels, np.asarray(q.slot_gt), 1)
    assert np.array_equal(np.asarray(q.labels)[:, in_use], gl[:, in_use])


def test_label_noise_rate_and_determinism():
    mask = np.ones((16, 6), bool)
    q1, labels, _ = make(mask, key=3, num_denoising=60)
    q2, _, _ = make(mask, key=3, num_denoising=60)
    assert np.array_equal(q1.labels, q2.labels) and np.array_equal(q1.boxes_unact, q2.boxes_unact)
    in_use = np.asarray(q1.slot_in_use)
    gl = np.take_along_axis(labels, np.asarray(q1.slot_gt), 1)[:, in_use]
    changed = np.mean(np.asarray(q1.labels)[:, in_use] != gl)
    # flipped with probability 0.25, to a uniform class (same class 1/4 of the time): 0.1875 expected
    assert 0.14 < changed < 0.24
    q3, _, _ = make(mask, key=4, num_denoising=60)
    assert not np.array_equal(q1.labels, q3.labels)


def test_disabled_returns_none():
    assert contrastive_denoising_group(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, 4)),
                                       jnp.ones((1, 2), bool), num_classes=3, num_queries=5, num_denoising=0,
                                       label_noise_ratio=0.5, box_noise_scale=1.0) is None
