"""ResNet-vd backbone with frozen batch norm (He et al., "Bag of Tricks", the "D" variant used by RT-DETR).

Deep stem (three 3x3 convs), average-pool shortcut on downsampling blocks, and, as in the reference
(lyuwenyu/RT-DETR `presnet.py`; transformers `modeling_rt_detr_resnet.py`), a projection shortcut forced on the
first block of every stage. NHWC layout; module names mirror transformers' so weights convert by name.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rtdetr_jax.config import RTDetrResNetConfig
from rtdetr_jax.modeling.layers import BatchNorm, Conv2d, Dtype, activation
from rtdetr_jax.ops.pool import max_pool2d

FROZEN_BN_EPS = 1e-5  # transformers' RTDetrV2FrozenBatchNorm2d hard-codes this


def avg_pool_2x2_ceil(x):
    """`nn.AvgPool2d(2, 2, 0, ceil_mode=True)`: odd edges get a partial window averaged over its valid pixels.

    x: (batch, height, width, channels) -> (batch, ceil(height/2), ceil(width/2), channels)
    """
    h, w = x.shape[1], x.shape[2]
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    window = (1, 2, 2, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, pad)
    if h % 2 == 0 and w % 2 == 0:
        return total * 0.25
    ones = jnp.ones((1, h, w, 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, window, pad)
    return total / count


class ConvLayer(nn.Module):
    """conv -> BN (frozen unless `frozen_bn=False`) -> activation (`RTDetrResNetConvLayer`)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    act: str | None = "relu"
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, x):
        x = Conv2d(self.features, self.kernel_size, self.stride, self.kernel_size // 2, dtype=self.dtype,
                   name="convolution")(x)
        x = BatchNorm(FROZEN_BN_EPS, dtype=self.dtype, frozen=self.frozen_bn, name="normalization")(x)
        return activation(self.act)(x)


class ShortCut(nn.Module):
    """1x1 conv -> frozen BN projection of the residual (`RTDetrResNetShortCut`)."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, x):
        x = Conv2d(self.features, 1, self.stride, 0, dtype=self.dtype, name="convolution")(x)
        return BatchNorm(FROZEN_BN_EPS, dtype=self.dtype, frozen=self.frozen_bn, name="normalization")(x)


class BasicLayer(nn.Module):
    """Two 3x3 convs plus shortcut (ResNet-18/34)."""

    config: RTDetrResNetConfig
    in_channels: int
    out_channels: int
    stride: int = 1
    should_apply_shortcut: bool = False
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, x):
        residual = x
        if self.should_apply_shortcut:
            if self.in_channels != self.out_channels:
                # transformers' nn.Sequential(AvgPool2d, ShortCut): the ShortCut is entry 1.
                residual = ShortCut(self.out_channels, 1, self.dtype, frozen_bn=self.frozen_bn, name="shortcut_1")(avg_pool_2x2_ceil(x))
            else:
                residual = ShortCut(self.out_channels, self.stride, self.dtype, frozen_bn=self.frozen_bn, name="shortcut")(x)
        x = ConvLayer(self.out_channels, 3, self.stride, self.config.hidden_act, self.dtype, frozen_bn=self.frozen_bn, name="layer_0")(x)
        x = ConvLayer(self.out_channels, 3, 1, None, self.dtype, frozen_bn=self.frozen_bn, name="layer_1")(x)
        return activation(self.config.hidden_act)(x + residual)


class BottleNeckLayer(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand, plus shortcut (ResNet-50/101)."""

    config: RTDetrResNetConfig
    in_channels: int
    out_channels: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, x):
        reduced = self.out_channels // 4
        project = self.in_channels != self.out_channels or self.stride != 1
        residual = x
        if self.stride == 2:
            residual = avg_pool_2x2_ceil(x)
            if project:
                residual = ShortCut(self.out_channels, 1, self.dtype, frozen_bn=self.frozen_bn, name="shortcut_1")(residual)
        elif project:
            residual = ShortCut(self.out_channels, self.stride, self.dtype, frozen_bn=self.frozen_bn, name="shortcut")(x)
        first_stride = self.stride if self.config.downsample_in_bottleneck else 1
        mid_stride = 1 if self.config.downsample_in_bottleneck else self.stride
        act = self.config.hidden_act
        x = ConvLayer(reduced, 1, first_stride, act, self.dtype, frozen_bn=self.frozen_bn, name="layer_0")(x)
        x = ConvLayer(reduced, 3, mid_stride, act, self.dtype, frozen_bn=self.frozen_bn, name="layer_1")(x)
        x = ConvLayer(self.out_channels, 1, 1, None, self.dtype, frozen_bn=self.frozen_bn, name="layer_2")(x)
        return activation(act)(x + residual)


class Stage(nn.Module):
    config: RTDetrResNetConfig
    in_channels: int
    out_channels: int
    stride: int
    depth: int
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        for i in range(self.depth):
            cin = self.in_channels if i == 0 else self.out_channels
            stride = self.stride if i == 0 else 1
            if cfg.layer_type == "bottleneck":
                x = BottleNeckLayer(cfg, cin, self.out_channels, stride, self.dtype, frozen_bn=self.frozen_bn, name=f"layers_{i}")(x)
            else:
                x = BasicLayer(cfg, cin, self.out_channels, stride, i == 0, self.dtype, frozen_bn=self.frozen_bn, name=f"layers_{i}")(x)
        return x


class Embedder(nn.Module):
    """Deep stem: 3x3/2, 3x3, 3x3 convs then 3x3/2 max pool: (B, H, W, 3) -> (B, H/4, W/4, embedding_size)."""

    config: RTDetrResNetConfig
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        half = cfg.embedding_size // 2
        x = ConvLayer(half, 3, 2, cfg.hidden_act, self.dtype, frozen_bn=self.frozen_bn, name="embedder_0")(x)
        x = ConvLayer(half, 3, 1, cfg.hidden_act, self.dtype, frozen_bn=self.frozen_bn, name="embedder_1")(x)
        x = ConvLayer(cfg.embedding_size, 3, 1, cfg.hidden_act, self.dtype, frozen_bn=self.frozen_bn, name="embedder_2")(x)
        return max_pool2d(x, 3, 2, 1)


class ResNetEncoder(nn.Module):
    config: RTDetrResNetConfig
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        outputs = [x]  # index 0 is the stem, as in transformers' stage_names
        in_channels = cfg.embedding_size
        for i, (out_channels, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
            stride = 2 if (i > 0 or cfg.downsample_in_first_stage) else 1
            x = Stage(cfg, in_channels, out_channels, stride, depth, self.dtype, frozen_bn=self.frozen_bn, name=f"stages_{i}")(x)
            outputs.append(x)
            in_channels = out_channels
        return outputs


class ResNetBackbone(nn.Module):
    """(B, H, W, 3) -> list of feature maps (B, H/s, W/s, C) at `config.out_indices`."""

    config: RTDetrResNetConfig
    dtype: Dtype = jnp.float32
    frozen_bn: bool = True  # config.freeze_backbone_batch_norms

    @nn.compact
    def __call__(self, pixel_values):
        x = Embedder(self.config, self.dtype, frozen_bn=self.frozen_bn, name="embedder")(pixel_values)
        stages = ResNetEncoder(self.config, self.dtype, frozen_bn=self.frozen_bn, name="encoder")(x)
        return [stages[i] for i in self.config.out_indices]
