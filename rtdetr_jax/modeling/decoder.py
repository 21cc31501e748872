"""RT-DETRv2 decoder: anchors with a valid mask, top-k query selection from the encoder memory, and deformable
decoder layers with iterative box refinement (Zhao et al. arXiv 2304.08069 section 4.3; Lv et al. 2407.17140).

Reference: transformers `RTDetrV2Model.forward` (query selection) and `RTDetrV2Decoder`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.modeling.deformable import MultiscaleDeformableAttention
from rtdetr_jax.modeling.layers import (
    Dtype,
    MLPPredictionHead,
    MultiheadSelfAttention,
    activation,
    dense,
    layer_norm,
    precise_dtype,
)


@functools.lru_cache(maxsize=32)
def generate_anchors(spatial_shapes: tuple[tuple[int, int], ...], grid_size: float = 0.05, dtype: str = "float32"):
    """Anchor boxes in logit space, one per feature-map cell, and which of them are valid.

    Computed once per shape on the host in `dtype` (transformers uses the model's dtype) as jit-time constants.
    Returns:
      anchors: (1, sum H_l * W_l, 4), inverse-sigmoid of (cx, cy, w, h); the dtype's max where invalid.
      valid_mask: (1, sum H_l * W_l, 1) bool, all four coordinates inside (0.01, 0.99).
    """
    f32 = np.dtype(dtype).type
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = np.meshgrid(np.arange(h, dtype=f32), np.arange(w, dtype=f32), indexing="ij")
        cx = (grid_x + f32(0.5)) / f32(w)
        cy = (grid_y + f32(0.5)) / f32(h)
        wh = np.full_like(cx, f32(grid_size) * f32(2.0**level))
        anchors.append(np.stack([cx, cy, wh, wh], -1).reshape(-1, 4))
    anchors = np.concatenate(anchors, 0)[None]
    eps = f32(1e-2)
    valid = np.all((anchors > eps) & (anchors < 1 - eps), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        logits = np.log(anchors / (f32(1) - anchors)).astype(f32)
    logits = np.where(valid, logits, np.finfo(f32).max).astype(f32)
    return logits, valid


def inverse_sigmoid(x, eps: float = 1e-5):
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention -> FFN, each post-norm (`RTDetrV2DecoderLayer`)."""

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, query_pos, memory, reference_points, spatial_shapes, attention_mask=None):
        cfg = self.config
        eps = cfg.layer_norm_eps
        residual = hidden_states
        hidden_states = MultiheadSelfAttention(cfg.decoder_attention_heads, self.dtype, name="self_attn")(
            hidden_states, query_pos, attention_mask
        )
        hidden_states = layer_norm("self_attn_layer_norm", eps, self.dtype)(residual + hidden_states)

        residual = hidden_states
        hidden_states = MultiscaleDeformableAttention(
            cfg.d_model,
            cfg.decoder_attention_heads,
            cfg.decoder_n_points_list,
            cfg.decoder_offset_scale,
            cfg.decoder_method,
            self.dtype,
            name="encoder_attn",
        )(hidden_states, query_pos, memory, reference_points, spatial_shapes)
        hidden_states = layer_norm("encoder_attn_layer_norm", eps, self.dtype)(residual + hidden_states)

        residual = hidden_states
        hidden_states = activation(cfg.decoder_activation_function)(
            dense(cfg.decoder_ffn_dim, "fc1", self.dtype)(hidden_states)
        )
        hidden_states = dense(cfg.d_model, "fc2", self.dtype)(hidden_states)
        return layer_norm("final_layer_norm", eps, self.dtype)(residual + hidden_states)


class Decoder(nn.Module):
    """Runs the decoder layers, refining boxes after each one.

    Args:
      target: (batch, queries, d_model) initial query content.
      reference_points_unact: (batch, queries, 4) initial boxes in logit space.
      memory: (batch, tokens, d_model) flattened multi-level features.
      spatial_shapes: static tuple of (H_l, W_l).
      attention_mask: optional (queries, queries) bool (True = may attend) or additive float mask, for the
        self-attention between denoising groups and matching queries.
    Returns:
      dict of hidden states (batch, layers, queries, d_model), logits (batch, layers, queries, classes) and
      reference points (batch, layers, queries, 4), plus the last hidden state.
    """

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, target, reference_points_unact, memory, spatial_shapes, attention_mask=None):
        cfg = self.config
        query_pos_head = MLPPredictionHead(2 * cfg.d_model, cfg.d_model, 2, self.dtype, name="query_pos_head")
        hidden_states = target
        fdtype = precise_dtype(self.dtype)
        if attention_mask is not None and attention_mask.dtype == jnp.bool_:
            # (queries, queries) True = may attend -> additive, broadcast over batch and heads
            attention_mask = jnp.where(attention_mask, 0.0, -jnp.inf).astype(fdtype)
        reference_points = jax.nn.sigmoid(reference_points_unact.astype(fdtype))
        hiddens, refs, logits = [], [], []
        for i in range(cfg.decoder_layers):
            query_pos = query_pos_head(reference_points.astype(self.dtype))
            hidden_states = DecoderLayer(cfg, self.dtype, name=f"layers_{i}")(
                hidden_states, query_pos, memory, reference_points[:, :, None, :], spatial_shapes, attention_mask
            )
            delta = MLPPredictionHead(cfg.d_model, 4, 3, self.dtype, name=f"bbox_embed_{i}")(hidden_states)
            new_reference_points = jax.nn.sigmoid(delta.astype(fdtype) + inverse_sigmoid(reference_points))
            reference_points = jax.lax.stop_gradient(new_reference_points)
            hiddens.append(hidden_states)
            refs.append(new_reference_points)
            logits.append(dense(cfg.num_labels, f"class_embed_{i}", self.dtype)(hidden_states))
        return {
            "last_hidden_state": hidden_states,
            "intermediate_hidden_states": jnp.stack(hiddens, 1),
            "intermediate_logits": jnp.stack(logits, 1),
            "intermediate_reference_points": jnp.stack(refs, 1),
        }
