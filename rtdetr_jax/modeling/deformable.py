"""Multi-scale deformable attention (Zhu et al., Deformable DETR, arXiv 2010.04159) in its RT-DETRv2 form:
per-level numbers of sampling points and two samplers (Lv et al., arXiv 2407.17140 section 3).

Samplers, both pure gathers (no grid_sample emulation, no per-query loops):
- "default": bilinear interpolation equal to `F.grid_sample(align_corners=False, padding_mode="zeros")`. The four
  corners of every sampling point of every level are gathered in one `take_along_axis` over the flattened
  multi-level value, with out-of-map corners given weight 0 (the zero padding).
- "discrete": the nearest pixel by `int(loc * size + 0.5)` clamped to the map, as transformers does.

Reference: transformers `multi_scale_deformable_attention_v2`; scenic `projects/baselines/deformable_detr/attention.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.modeling.layers import Dtype, LinearParameters, dense, precise_dtype
from rtdetr_jax.ops import deformable_sampling


def _level_tables(spatial_shapes, points_per_level):
    """Per sampling point (levels flattened): its map height, width and start offset in the flat value."""
    level_of_point = np.repeat(np.arange(len(points_per_level)), points_per_level)
    heights = np.array([h for h, _ in spatial_shapes], np.int32)
    widths = np.array([w for _, w in spatial_shapes], np.int32)
    starts = np.concatenate([[0], np.cumsum(heights * widths)[:-1]]).astype(np.int32)
    return heights[level_of_point], widths[level_of_point], starts[level_of_point]


def _sampling_taps(spatial_shapes, sampling_locations, attention_weights, points_per_level, method):
    """The flat-value token index and the weight of every tap of every sampling point.

    A tap is one of a point's four bilinear corners ("default"; a corner outside its map gets weight 0, the zero
    padding) or its rounded pixel ("discrete"); its weight is the point's attention weight times the corner's
    bilinear weight.
    Returns:
      index: (batch, queries, heads, taps) int32 rows of the flattened multi-level value; taps = points * corners.
      weight: (batch, queries, heads, taps) in float32 (float64 under x64).
    """
    num_points = sampling_locations.shape[3]
    if num_points != sum(points_per_level):
        raise ValueError(f"sampling_locations has {num_points} points, points_per_level {points_per_level} sums to "
                         f"{sum(points_per_level)}")
    height, width, start = (jnp.asarray(t) for t in _level_tables(spatial_shapes, points_per_level))
    fdtype = precise_dtype(sampling_locations.dtype)
    loc = sampling_locations.astype(fdtype)
    attention_weights = attention_weights.astype(fdtype)
    x, y = loc[..., 0], loc[..., 1]

    if method == "default":
        # grid_sample(align_corners=False): pixel coordinate = normalised * size - 0.5
        px = x * width - 0.5
        py = y * height - 0.5
        x0 = jnp.floor(px)
        y0 = jnp.floor(py)
        fx = px - x0
        fy = py - y0
        x0 = x0.astype(jnp.int32)
        y0 = y0.astype(jnp.int32)
        # (batch, queries, heads, points, 4 corners)
        cx = jnp.stack([x0, x0 + 1, x0, x0 + 1], -1)
        cy = jnp.stack([y0, y0, y0 + 1, y0 + 1], -1)
        bilinear = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
        w_, h_ = width[:, None], height[:, None]
        inside = (cx >= 0) & (cx < w_) & (cy >= 0) & (cy < h_)
        index = start[:, None] + jnp.clip(cy, 0, h_ - 1) * w_ + jnp.clip(cx, 0, w_ - 1)
        weight = jnp.where(inside, bilinear, 0.0) * attention_weights[..., None]
    elif method == "discrete":
        # transformers: (loc * [W, H] + 0.5).to(int64), then clamp; the cast truncates toward zero
        ix = jnp.clip((x * width + 0.5).astype(jnp.int32), 0, width - 1)
        iy = jnp.clip((y * height + 0.5).astype(jnp.int32), 0, height - 1)
        index = (start + iy * width + ix)[..., None]
        weight = attention_weights[..., None]
    else:
        raise ValueError(f"unknown sampling method {method!r}; use 'default' or 'discrete'")
    batch, queries, heads = index.shape[:3]
    return index.reshape(batch, queries, heads, -1), weight.reshape(batch, queries, heads, -1)


def _sample_heads(value, index, weight):
    """(batch, tokens, heads, head_dim) value, (batch, queries, heads, taps) taps -> (batch, queries, heads,
    head_dim): every head's weighted sum of its own channels at its taps, by XLA's gather. (The C++ kernel of
    ops/deformable_sampling.py computes the same sums and their gradient; in the r18vd batch-4 training step on the
    CPU it saved ~80 ms of thread time a step, but the step's time did not move in two A/B runs, so training keeps
    XLA's gathers: benchmarks/README.md.)"""
    batch, _, heads, head_dim = value.shape
    _, queries, _, taps = index.shape
    # rows of the value flattened over (token, head): row = token * heads + head
    # (batch, queries * heads * taps, 1)
    rows = (index * heads + jnp.arange(heads, dtype=index.dtype)[:, None]).reshape(batch, -1, 1)
    # (batch, tokens * heads, head_dim)
    sampled = jnp.take_along_axis(value.reshape(batch, -1, head_dim), rows, axis=1, mode="clip")
    # (batch, queries, heads, taps, head_dim)
    sampled = sampled.reshape(batch, queries, heads, taps, head_dim)
    weight = weight[..., None].astype(sampled.dtype)
    # the weighted sum fuses with the gather (a batched matmul over 4-16 terms would first copy the gathered
    # values into a matmul layout)
    return jnp.sum(weight * sampled, axis=3)


def multi_scale_deformable_sampling(
    value,
    spatial_shapes,
    sampling_locations,
    attention_weights,
    points_per_level,
    method: str = "default",
):
    """Attention-weighted sum of values sampled at fractional locations of several feature maps.

    Args:
      value: (batch, sum_l H_l * W_l, heads, head_dim), levels concatenated in order, each row-major.
      spatial_shapes: static tuple of (H_l, W_l).
      sampling_locations: (batch, queries, heads, sum_l P_l, 2), (x, y) in [0, 1] of each level's map.
      attention_weights: (batch, queries, heads, sum_l P_l), already normalised.
      points_per_level: static tuple (P_0, ..., P_{L-1}).
      method: "default" (bilinear) or "discrete" (nearest by rounding).
    Returns:
      (batch, queries, heads * head_dim)
    """
    index, weight = _sampling_taps(spatial_shapes, sampling_locations, attention_weights, points_per_level, method)
    out = _sample_heads(value, index, weight)
    return out.reshape(*out.shape[:2], -1)


def _project_then_sample(memory, kernel, bias, index, weight):
    """The value projection over every token, then each head's taps of it: (batch, queries, heads, head_dim)."""
    batch, tokens, channels = memory.shape
    heads = index.shape[2]
    value = (memory.reshape(-1, channels) @ kernel + bias).reshape(batch, tokens, heads, -1)
    return _sample_heads(value, index, weight)


def _sample_then_project(memory, kernel, bias, index, weight):
    """The same sum with the projection moved after the sampling, which is linear: every head takes its weighted
    sum of all `channels` of the memory at its taps, then projects it with its own slice of the kernel, and the
    bias enters times the sum of the tap weights. The r18vd decoder samples 300 queries x 8 heads x 48 taps from
    8400 tokens, so this projects 2400 rows per image instead of 8400; the gathered rows are 8x wider.
    One gather per tap (a static 4-48), summed in one fused loop that runs along the channels; XLA's reduce over
    a taps axis of the same gathers ran ~5x slower.
    Returns (batch, queries, heads, head_dim)."""
    batch, queries, heads, taps = index.shape
    channels = memory.shape[-1]
    head_dim = kernel.shape[1] // heads
    dtype = memory.dtype
    targets = deformable_sampling.sampling_targets(dtype, weight.dtype)
    if targets is not None:
        # the C++ kernel (float32 on the CPU; r18vd at batch 8 1.8% faster in both orders of an A/B, even at batch
        # 1): every head reads the same memory rows (one group); (batch, queries, heads, channels)
        summed = deformable_sampling.weighted_gather(memory[:, :, None, :], index, weight, targets)
        out = jnp.einsum("bqhc,chd->bqhd", summed, kernel.reshape(channels, heads, head_dim))
        return out + weight.sum(-1)[..., None] * bias.reshape(heads, head_dim)
    sum_dtype = precise_dtype(dtype)  # the 4-48 terms are summed in float32 also for bfloat16 memory
    # head-major taps, so that the sums come out as the (heads, rows, channels) operand of a batched matmul
    index = jnp.transpose(index, (0, 2, 1, 3))  # (batch, heads, queries, taps)
    weight = jnp.transpose(weight, (2, 0, 1, 3)).astype(sum_dtype)  # (heads, batch, queries, taps)
    summed = None
    for tap in range(taps):
        rows = index[..., tap].reshape(batch, heads * queries, 1)
        # (heads, batch, queries, channels)
        sampled = jnp.take_along_axis(memory, rows, axis=1, mode="clip").reshape(batch, heads, queries, channels)
        term = weight[..., tap, None] * jnp.transpose(sampled, (1, 0, 2, 3)).astype(sum_dtype)
        summed = term if summed is None else summed + term
    # (heads, channels, head_dim)
    head_kernels = jnp.transpose(kernel.reshape(channels, heads, head_dim), (1, 0, 2))
    out = jax.lax.dot_general(summed.astype(dtype).reshape(heads, batch * queries, channels), head_kernels,
                              (((2,), (1,)), ((0,), (0,))))
    bias_term = (weight.sum(-1)[..., None] * bias.reshape(heads, 1, 1, -1)).astype(dtype)
    out = out.reshape(heads, batch, queries, head_dim) + bias_term
    return jnp.transpose(out, (1, 2, 0, 3))


@jax.custom_jvp
def _projected_sampling(memory, kernel, bias, index, weight):
    # XLA:CPU gets the projection-last form. Elsewhere (GPU, TPU) the value is projected first, as transformers
    # does: there the projection's matmul should be cheap and the 8x wider gathers not (not measured: no GPU has
    # been lent to this project's sessions).
    return jax.lax.platform_dependent(memory, kernel, bias, index, weight, cpu=_sample_then_project,
                                      default=_project_then_sample)


@_projected_sampling.defjvp
def _projected_sampling_jvp(primals, tangents):
    # Derivatives always go through the projection-first form: its reverse pass scatters 8x narrower rows. On the
    # CPU the projection-last form with its own backward took one layer's forward and backward at batch 4 (500
    # queries) from 117 to 125-136 ms: there the wide gathers are bound by the cache's bandwidth.
    memory, kernel, bias, index, weight = primals
    d_memory, d_kernel, d_bias, _, d_weight = tangents

    def project_then_sample(m, k, b, w):
        return _project_then_sample(m, k, b, index, w)

    return jax.jvp(project_then_sample, (memory, kernel, bias, weight), (d_memory, d_kernel, d_bias, d_weight))


def projected_deformable_sampling(
    memory,
    kernel,
    bias,
    spatial_shapes,
    sampling_locations,
    attention_weights,
    points_per_level,
    method: str = "default",
    value_mask=None,
):
    """`multi_scale_deformable_sampling` of the projected value `memory @ kernel + bias`, split into heads.

    Args:
      memory: (batch, sum_l H_l * W_l, channels) flattened multi-level features.
      kernel: (channels, heads * head_dim) and bias: (heads * head_dim,), the value projection.
      sampling_locations, attention_weights, spatial_shapes, points_per_level, method: as
        `multi_scale_deformable_sampling`, whose heads are sampling_locations.shape[2].
      value_mask: optional (batch, tokens) bool, False where the projected value is zero (its bias too): such
        tokens' taps get weight 0.
    Returns:
      (batch, queries, heads * head_dim)
    """
    heads = sampling_locations.shape[2]
    if kernel.shape[0] != memory.shape[-1] or kernel.shape[1] % heads or bias.shape != (kernel.shape[1],):
        raise ValueError(f"value projection kernel {kernel.shape} and bias {bias.shape} do not fit memory "
                         f"{memory.shape} split into {heads} heads")
    if value_mask is not None and value_mask.shape != memory.shape[:2]:
        raise ValueError(f"value_mask has shape {value_mask.shape}, expected (batch, tokens) = {memory.shape[:2]}")
    index, weight = _sampling_taps(spatial_shapes, sampling_locations, attention_weights, points_per_level, method)
    if value_mask is not None:
        # (batch, queries, heads, taps): whether each tap's token is kept
        kept = jnp.take_along_axis(value_mask, index.reshape(index.shape[0], -1), axis=1).reshape(index.shape)
        weight = jnp.where(kept, weight, 0.0)
    out = _projected_sampling(memory, kernel, bias, index, weight)
    return out.reshape(*out.shape[:2], -1)


class MultiscaleDeformableAttention(nn.Module):
    """RT-DETRv2 deformable cross-attention (`RTDetrV2MultiscaleDeformableAttention`). The value projection
    (`value_proj`) is applied by `projected_deformable_sampling`: on the CPU after the sampling, elsewhere and in
    derivatives to every token first, as transformers does.

    Args:
      hidden_states: (batch, queries, d_model) queries.
      position_embeddings: (batch, queries, d_model), added to the queries.
      encoder_hidden_states: (batch, tokens, d_model) flattened multi-level memory.
      reference_points: (batch, queries, 1, 4) boxes (cx, cy, w, h) in [0, 1], or (batch, queries, levels, 2).
      spatial_shapes: static tuple of (H_l, W_l).
      value_mask: optional (batch, tokens) bool, False where the value is zeroed.
    Returns:
      (batch, queries, d_model)
    """

    d_model: int
    num_heads: int
    points_per_level: tuple[int, ...]
    offset_scale: float = 0.5
    method: str = "default"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, position_embeddings, encoder_hidden_states, reference_points, spatial_shapes,
                 value_mask=None):
        b, q, _ = hidden_states.shape
        heads = self.num_heads
        total_points = sum(self.points_per_level)
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings

        # the value projection is applied inside the sampling (`projected_deformable_sampling`)
        value_kernel, value_bias = LinearParameters(encoder_hidden_states.shape[-1], self.d_model, name="value_proj")()
        # (batch, queries, heads, levels * points, 2)
        offsets = dense(heads * total_points * 2, "sampling_offsets", self.dtype)(hidden_states)
        fdtype = precise_dtype(self.dtype)
        offsets = offsets.reshape(b, q, heads, total_points, 2).astype(fdtype)
        # (batch, queries, heads, levels * points)
        weights = dense(heads * total_points, "attention_weights", self.dtype)(hidden_states)
        weights = jax.nn.softmax(weights.reshape(b, q, heads, total_points).astype(fdtype), axis=-1)

        ref = reference_points.astype(fdtype)
        if ref.shape[-1] == 4:
            # (levels * points, 1): 1 / P_l for every point of level l
            points_scale = jnp.asarray(
                np.concatenate([np.full(p, 1.0 / p, np.float32) for p in self.points_per_level]), fdtype
            )[:, None]
            locations = ref[:, :, None, :, :2] + offsets * points_scale * ref[:, :, None, :, 2:] * self.offset_scale
        elif ref.shape[-1] == 2:
            level_of_point = np.repeat(np.arange(len(self.points_per_level)), self.points_per_level)
            # (levels * points, 2) as (W_l, H_l)
            normalizer = jnp.asarray(np.array([[w, h] for h, w in spatial_shapes], np.float32)[level_of_point], fdtype)
            locations = ref[:, :, None, level_of_point, :] + offsets / normalizer
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got shape {reference_points.shape}")

        out = projected_deformable_sampling(
            encoder_hidden_states.astype(self.dtype), value_kernel.astype(self.dtype), value_bias.astype(self.dtype),
            spatial_shapes, locations, weights, self.points_per_level, self.method, value_mask
        )
        return dense(self.d_model, "output_proj", self.dtype)(out.astype(self.dtype))
