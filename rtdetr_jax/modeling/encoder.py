"""Hybrid encoder of RT-DETR: AIFI (a transformer layer on the coarsest map) + CCFM (FPN top-down, PAN bottom-up
with CSPRep/RepVGG fusion blocks). Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection" (arXiv 2304.08069)
section 4.2; reference code lyuwenyu/RT-DETR `hybrid_encoder.py` and transformers `RTDetrV2HybridEncoder`.

All maps are NHWC. Module names mirror the transformers checkpoint (`encoder.encoder_0` is the AIFI block, stored
as `model.encoder.encoder.0` in safetensors).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.modeling.layers import (BatchNorm, Conv2d, Dtype, MultiheadSelfAttention, activation, dense,
                                       fold_conv_norm, layer_norm)
from rtdetr_jax.ops.conv import conv2d


@functools.lru_cache(maxsize=32)
def sincos_position_embedding_2d(height: int, width: int, dim: int, temperature: float) -> np.ndarray:
    """2D sin-cos embedding laid out `[sin_h | cos_h | sin_w | cos_w]`, row-major over (h, w).

    Computed once per shape on the host in float64 (as transformers does), so it is a jit-time constant.
    Returns (1, height * width, dim) float64; callers cast to their compute dtype.
    """
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (np.arange(pos_dim, dtype=np.float64) / pos_dim)
    grid_h, grid_w = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    emb_h = grid_h.reshape(-1, 1) * omega[None]
    emb_w = grid_w.reshape(-1, 1) * omega[None]
    emb = np.concatenate([np.sin(emb_h), np.cos(emb_h), np.sin(emb_w), np.cos(emb_w)], axis=1)
    return emb[None]


class ConvNormLayer(nn.Module):
    """conv (no bias) -> batch norm -> optional activation (`RTDetrV2ConvNormLayer`)."""

    config: RTDetrV2Config
    features: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None
    act: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, dtype=self.dtype, name="conv")(x)
        x = BatchNorm(self.config.batch_norm_eps, dtype=self.dtype, name="norm")(x)
        return activation(self.act)(x)


class RepVggBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN, summed, then activation.

    At inference (running statistics) the two branches are one 3x3 convolution: each batch norm is folded into its
    kernel and the 1x1 kernel is added to the 3x3 one's centre tap (RepVGG re-parameterisation, what
    rtdetrv2_pytorch's `convert_to_deploy` does once on the weights). Done here inside the jitted function, it costs
    a few (3, 3, c, c) elementwise ops per call and saves the 1x1 convolution and one full-size add.
    """

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    def setup(self):
        c = int(self.config.encoder_hidden_dim * self.config.hidden_expansion)
        self.conv1 = ConvNormLayer(self.config, c, 3, 1, 1, None, self.dtype)
        self.conv2 = ConvNormLayer(self.config, c, 1, 1, 0, None, self.dtype)

    def __call__(self, x):
        act = activation(self.config.activation_function)
        if self.is_initializing() or self.is_mutable_collection("batch_stats"):  # training: batch statistics
            return act(self.conv1(x) + self.conv2(x))
        eps = self.config.batch_norm_eps
        kernel3, shift3 = fold_conv_norm(self.conv1.variables, eps)  # (3, 3, c, c), (c,)
        kernel1, shift1 = fold_conv_norm(self.conv2.variables, eps)  # (1, 1, c, c), (c,)
        kernel = kernel3 + jnp.pad(kernel1, ((1, 1), (1, 1), (0, 0), (0, 0)))
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), 1, 1)
        return act(y + (shift3 + shift1).astype(self.dtype))


class CSPRepLayer(nn.Module):
    """Cross-stage-partial fusion: (B, H, W, 2 * hidden) -> (B, H, W, hidden)."""

    config: RTDetrV2Config
    num_blocks: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        out_channels = cfg.encoder_hidden_dim
        hidden = int(out_channels * cfg.hidden_expansion)
        act = cfg.activation_function
        a = ConvNormLayer(cfg, hidden, 1, 1, None, act, self.dtype, name="conv1")(x)
        for i in range(self.num_blocks):
            a = RepVggBlock(cfg, self.dtype, name=f"bottlenecks_{i}")(a)
        b = ConvNormLayer(cfg, hidden, 1, 1, None, act, self.dtype, name="conv2")(x)
        y = a + b
        if hidden != out_channels:
            y = ConvNormLayer(cfg, out_channels, 1, 1, None, act, self.dtype, name="conv3")(y)
        return y


class EncoderLayer(nn.Module):
    """Transformer encoder layer (post-norm by default; `normalize_before` gives pre-norm)."""

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, position_embeddings):
        cfg = self.config
        eps = cfg.layer_norm_eps
        attn_norm = layer_norm("self_attn_layer_norm", eps, self.dtype)
        ffn_norm = layer_norm("final_layer_norm", eps, self.dtype)
        residual = hidden_states
        if cfg.normalize_before:
            hidden_states = attn_norm(hidden_states)
        hidden_states = MultiheadSelfAttention(cfg.encoder_attention_heads, self.dtype, name="self_attn")(
            hidden_states, position_embeddings
        )
        hidden_states = residual + hidden_states
        if not cfg.normalize_before:
            hidden_states = attn_norm(hidden_states)
        if cfg.normalize_before:
            hidden_states = ffn_norm(hidden_states)
        residual = hidden_states
        hidden_states = activation(cfg.encoder_activation_function)(
            dense(cfg.encoder_ffn_dim, "fc1", self.dtype)(hidden_states)
        )
        hidden_states = residual + dense(cfg.encoder_hidden_dim, "fc2", self.dtype)(hidden_states)
        if not cfg.normalize_before:
            hidden_states = ffn_norm(hidden_states)
        return hidden_states


class AIFILayer(nn.Module):
    """Attention-based intra-scale feature interaction on one map: (B, H, W, C) -> (B, H, W, C)."""

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, h, w, c = x.shape
        # (batch, h * w, channels), row-major like torch's flatten(2).transpose(1, 2)
        tokens = x.reshape(b, h * w, c)
        pos = jnp.asarray(sincos_position_embedding_2d(h, w, c, float(cfg.positional_encoding_temperature)),
                          dtype=tokens.dtype)
        for i in range(cfg.encoder_layers):
            tokens = EncoderLayer(cfg, self.dtype, name=f"layers_{i}")(tokens, pos)
        return tokens.reshape(b, h, w, c)


def upsample_nearest_2x(x):
    """`F.interpolate(scale_factor=2, mode="nearest")` on (B, H, W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class HybridEncoder(nn.Module):
    """Projected backbone maps (list of (B, H_l, W_l, hidden), fine to coarse) -> fused maps, same shapes."""

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature_maps):
        cfg = self.config
        act = cfg.activation_function
        feats = list(feature_maps)
        if cfg.encoder_layers > 0:
            for i, level in enumerate(cfg.encode_proj_layers):
                feats[level] = AIFILayer(cfg, self.dtype, name=f"encoder_{i}")(feats[level])

        num_stages = len(feats) - 1
        hidden = cfg.encoder_hidden_dim
        # top-down FPN: coarse -> fine
        fpn = [feats[-1]]
        for i in range(num_stages):
            lateral = ConvNormLayer(cfg, hidden, 1, 1, None, act, self.dtype, name=f"lateral_convs_{i}")(fpn[-1])
            fpn[-1] = lateral
            finer = feats[num_stages - i - 1]
            up = upsample_nearest_2x(lateral)
            if up.shape[1:3] != finer.shape[1:3]:
                raise ValueError(
                    f"feature map sizes {finer.shape[1:3]} and 2x{lateral.shape[1:3]} do not line up; "
                    "input height and width must be multiples of 32"
                )
            fpn.append(CSPRepLayer(cfg, dtype=self.dtype, name=f"fpn_blocks_{i}")(jnp.concatenate([up, finer], -1)))
        fpn.reverse()

        # bottom-up PAN: fine -> coarse
        pan = [fpn[0]]
        for i in range(num_stages):
            down = ConvNormLayer(cfg, hidden, 3, 2, None, act, self.dtype, name=f"downsample_convs_{i}")(pan[-1])
            fused = jnp.concatenate([down, fpn[i + 1]], -1)
            pan.append(CSPRepLayer(cfg, dtype=self.dtype, name=f"pan_blocks_{i}")(fused))
        return pan
