"""Training initialisation of a fresh detector, as the authors' `RTDETRTransformerv2._reset_parameters` and
`MSDeformableAttention._reset_parameters` (also transformers' `_init_weights`):

- classification heads (encoder and every decoder layer): bias = -log((1 - p) / p), p = 0.01 (the authors'
  `bias_init_with_prob(0.01)`; `initializer_bias_prior_prob` overrides it); weights xavier-uniform;
- box heads' last layer zero, so the first boxes are the anchors / reference points;
- deformable attention: zero offset weights, offset bias on a ring of directions (point i at distance i + 1),
  zero attention-weight projection, xavier value and output projections;
- xavier for `enc_output.0`, the query position head, the decoder input projections and the query embeddings.
Batch norms keep weight 1 (the authors'; transformers' N(0, 0.01) makes an untrained encoder nearly silent).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rtdetr_jax.config import RTDetrV2Config


def _xavier(key, shape):
    """PyTorch's xavier_uniform_ for a flax kernel: (in, out) linears, (kh, kw, in, out) convolutions."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


def sampling_offset_bias(config: RTDetrV2Config) -> np.ndarray:
    heads = config.decoder_attention_heads
    points = config.decoder_n_points_list
    thetas = np.arange(heads, dtype=np.float32) * (2.0 * math.pi / heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)  # (heads, 2)
    rows = [grid[:, None, :] * (i + 1) for n in points for i in range(n)]  # per level, per point
    return np.concatenate(rows, axis=1).reshape(-1).astype(np.float32)  # (heads * total_points * 2,)


def reset_parameters(params, config: RTDetrV2Config, seed: int = 0):
    """Return `params` (the `params` collection of a freshly initialised detector) re-initialised for training."""
    prior = config.initializer_bias_prior_prob or 0.01
    bias = -math.log((1 - prior) / prior)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(flat)))
    offset_bias = sampling_offset_bias(config)
    out = {}
    for path, value in flat.items():
        name = "/".join(path)
        leaf = path[-1]
        shape = np.shape(value)
        new = value
        is_class_head = "enc_score_head" in path or any(p.startswith("class_embed_") for p in path)
        is_box_last = (("enc_bbox_head" in path or any(p.startswith("bbox_embed_") for p in path))
                       and "layers_2" in path)
        if is_class_head:
            new = _xavier(next(keys), shape) if leaf == "kernel" else jnp.full(shape, bias, jnp.float32)
        elif is_box_last:
            new = jnp.zeros(shape, jnp.float32)
        elif "sampling_offsets" in path:
            new = jnp.zeros(shape, jnp.float32) if leaf == "kernel" else jnp.asarray(offset_bias)
        elif "attention_weights" in path and "encoder_attn" in path:
            new = jnp.zeros(shape, jnp.float32)
        elif "encoder_attn" in path and ("value_proj" in path or "output_proj" in path):
            new = _xavier(next(keys), shape) if leaf == "kernel" else jnp.zeros(shape, jnp.float32)
        elif leaf == "kernel" and ("query_pos_head" in path or name.startswith("model/enc_output/0")
                                   or any(p.startswith("decoder_input_proj_") for p in path)):
            new = _xavier(next(keys), shape)
        elif leaf == "embedding" and ("denoising_class_embed" in path or "weight_embedding" in path):
            new = _xavier(next(keys), shape)
        out[path] = jnp.asarray(new, jnp.float32)
    return traverse_util.unflatten_dict(out)
