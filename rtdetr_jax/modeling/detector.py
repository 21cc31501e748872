"""The whole RT-DETRv2 detector: backbone -> input projections -> hybrid encoder -> query selection -> decoder.

`RTDetrV2Detector` is a pure flax module; its variables are `{"params": ..., "batch_stats": ...}` with module
names mirroring transformers' `RTDetrV2ForObjectDetection` (everything under `model`, as in the checkpoint).
It takes NCHW `pixel_values` like transformers and returns `RTDetrV2ObjectDetectionOutput`.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.modeling.backbone import ResNetBackbone
from rtdetr_jax.modeling.decoder import Decoder, generate_anchors
from rtdetr_jax.modeling.denoising import DenoisingQueries
from rtdetr_jax.modeling.encoder import HybridEncoder
from rtdetr_jax.modeling.layers import (BatchNorm, Conv2d, Dtype, MLPPredictionHead, dense, layer_norm, precise_dtype,
                                       rows_dot_general)


@flax.struct.dataclass
class RTDetrV2ObjectDetectionOutput:
    """Same names and shapes as transformers' `RTDetrV2ObjectDetectionOutput` (inference fields).

    logits: (batch, queries, classes); pred_boxes: (batch, queries, 4) normalised (cx, cy, w, h);
    last_hidden_state: (batch, queries, d_model); intermediate_*: (batch, decoder_layers, queries, ...);
    init_reference_points: (batch, queries, 4) logit-space boxes fed to the decoder;
    enc_topk_logits / enc_topk_bboxes: (batch, queries, classes) / (batch, queries, 4) of the selected proposals;
    enc_outputs_class / enc_outputs_coord_logits: (batch, tokens, classes) / (batch, tokens, 4) for every anchor;
    encoder_last_hidden_state: tuple of NCHW maps (batch, encoder_hidden_dim, H_l, W_l), fine to coarse.
    Training with denoising queries adds dn_intermediate_logits / dn_intermediate_reference_points
    (batch, decoder_layers, slots, ...) and the `DenoisingQueries` they came from; the fields above then hold the
    matching queries only (transformers concatenates both and splits them in the loss).
    loss / loss_dict: total and named loss terms when called with labels.
    """

    logits: Any = None
    pred_boxes: Any = None
    last_hidden_state: Any = None
    intermediate_hidden_states: Any = None
    intermediate_logits: Any = None
    intermediate_reference_points: Any = None
    init_reference_points: Any = None
    enc_topk_logits: Any = None
    enc_topk_bboxes: Any = None
    enc_outputs_class: Any = None
    enc_outputs_coord_logits: Any = None
    encoder_last_hidden_state: Any = None
    dn_intermediate_logits: Any = None
    dn_intermediate_reference_points: Any = None
    denoising: Any = None
    loss: Any = None
    loss_dict: Any = None

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in self.__dataclass_fields__.values() if getattr(self, f.name) is not None]


def input_stride(config: RTDetrV2Config) -> int:
    """Input height and width must be multiples of this (the coarsest feature map's stride)."""
    extra_levels = max(0, config.num_feature_levels - len(config.feat_strides))
    return max(config.feat_strides) * 2**extra_levels


def num_tokens(config: RTDetrV2Config, height: int, width: int) -> int:
    """Number of encoder tokens (anchors) for an input of `height` x `width`."""
    strides = list(config.feat_strides)
    while len(strides) < config.num_feature_levels:
        strides.append(strides[-1] * 2)
    return sum((height // s) * (width // s) for s in strides)


def init_input_size(config: RTDetrV2Config) -> int:
    """Smallest square input with enough tokens to select `num_queries` from (used to build parameters)."""
    size = input_stride(config)
    while num_tokens(config, size, size) < config.num_queries:
        size += input_stride(config)
    return size


class ConvEncoder(nn.Module):
    """transformers' `RTDetrV2ConvEncoder`: holds the ResNet under the name `model`."""

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        return ResNetBackbone(self.config.backbone_config, self.dtype,
                              frozen_bn=self.config.freeze_backbone_batch_norms, name="model")(pixel_values)


class ConvBN(nn.Module):
    """`nn.Sequential(Conv2d(bias=False), BatchNorm2d)`: entries named `0` and `1`."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv2d(self.features, self.kernel_size, self.stride, dtype=self.dtype, name="0")(x)
        return BatchNorm(self.eps, dtype=self.dtype, name="1")(x)


class EncOutput(nn.Module):
    """`nn.Sequential(Linear, LayerNorm)` applied to the memory before query selection."""

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.config.d_model, "0", self.dtype)(x)
        return layer_norm("1", self.config.layer_norm_eps, self.dtype)(x)


class RTDetrV2Model(nn.Module):
    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.backbone = ConvEncoder(cfg, self.dtype)
        # transformers' encoder_input_proj uses BatchNorm2d's default eps (1e-5), not batch_norm_eps
        self.encoder_input_proj = [
            ConvBN(cfg.encoder_hidden_dim, 1, 1, 1e-5, self.dtype) for _ in cfg.encoder_in_channels
        ]
        self.encoder = HybridEncoder(cfg, self.dtype)
        if cfg.num_denoising > 0:
            self.denoising_class_embed = nn.Embed(cfg.num_labels + 1, cfg.d_model, param_dtype=jnp.float32)
        if cfg.learn_initial_query:
            self.weight_embedding = nn.Embed(cfg.num_queries, cfg.d_model, param_dtype=jnp.float32)
        self.enc_output = EncOutput(cfg, self.dtype)
        self.enc_score_head = nn.Dense(cfg.num_labels, dtype=self.dtype, param_dtype=jnp.float32,
                                       dot_general=rows_dot_general)
        self.enc_bbox_head = MLPPredictionHead(cfg.d_model, 4, 3, self.dtype)
        projections = [ConvBN(cfg.d_model, 1, 1, cfg.batch_norm_eps, self.dtype) for _ in cfg.decoder_in_channels]
        for _ in range(cfg.num_feature_levels - len(cfg.decoder_in_channels)):
            projections.append(ConvBN(cfg.d_model, 3, 2, cfg.batch_norm_eps, self.dtype))
        self.decoder_input_proj = projections
        self.decoder = Decoder(cfg, self.dtype)

    def backbone_features(self, pixel_values):
        """(batch, 3, H, W) pixels -> the backbone's NHWC maps of its `out_indices` stages (`method=` entry point)."""
        # transformers layout (batch, 3, H, W) -> NHWC
        return self.backbone(jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype))

    def encode(self, pixel_values):
        """(batch, 3, H, W) pixels -> the hybrid encoder's NHWC maps (`method=` entry point; profiling uses it)."""
        features = self.backbone_features(pixel_values)
        return self.encoder([p(f) for p, f in zip(self.encoder_input_proj, features)])

    def __call__(self, pixel_values, denoising: DenoisingQueries | None = None):
        cfg = self.config
        if cfg.num_denoising > 0 and self.is_initializing():
            # used only in training; touched here so that init creates its parameters
            self.denoising_class_embed(jnp.zeros((1,), jnp.int32))
        encoded = self.encode(pixel_values)

        sources = [self.decoder_input_proj[i](m) for i, m in enumerate(encoded)]
        # extra coarser levels: transformers applies each extra projection to the last encoder map
        for i in range(len(sources), cfg.num_feature_levels):
            sources.append(self.decoder_input_proj[i](encoded[-1]))
        spatial_shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in sources)
        batch = pixel_values.shape[0]
        # (batch, sum H_l * W_l, d_model)
        memory = jnp.concatenate([s.reshape(batch, -1, s.shape[-1]) for s in sources], axis=1)

        fdtype = precise_dtype(self.dtype)
        anchors_np, valid_np = generate_anchors(spatial_shapes, dtype=jnp.dtype(fdtype).name)
        anchors = jnp.asarray(anchors_np)
        valid = jnp.asarray(valid_np)
        masked_memory = valid.astype(memory.dtype) * memory
        output_memory = self.enc_output(masked_memory)  # (batch, tokens, d_model)
        enc_outputs_class = self.enc_score_head(output_memory).astype(fdtype)
        enc_outputs_coord_logits = self.enc_bbox_head(output_memory).astype(fdtype) + anchors

        # query selection: top-k tokens by their best class score; (batch, queries)
        _, topk_index = jax.lax.top_k(jnp.max(enc_outputs_class, axis=-1), cfg.num_queries)
        take = lambda a: jnp.take_along_axis(a, topk_index[..., None], axis=1)  # noqa: E731
        # The selected tokens' logits, boxes and queries come from the heads applied again to the selected rows
        # only (the same row-wise computation as gathering their dense outputs; transformers gathers). The loss
        # and the eval step use only these, so the backward runs through enc_output and the heads on
        # batch x queries rows instead of batch x tokens, and XLA drops the dense box head when
        # `enc_outputs_coord_logits` is not used: 37 of the r18vd batch-4 train step's 597 GFLOP.
        selected_memory = self.enc_output(take(masked_memory))  # (batch, queries, d_model)
        enc_topk_logits = self.enc_score_head(selected_memory).astype(fdtype)
        selected_anchors = jnp.take(anchors[0], topk_index, axis=0)  # (batch, queries, 4)
        reference_points_unact = self.enc_bbox_head(selected_memory).astype(fdtype) + selected_anchors
        enc_topk_bboxes = jax.nn.sigmoid(reference_points_unact)
        if cfg.learn_initial_query:
            target = jnp.broadcast_to(self.weight_embedding.embedding[None], (batch, cfg.num_queries, cfg.d_model))
            target = target.astype(self.dtype)
        else:
            target = jax.lax.stop_gradient(selected_memory)
        init_reference_points = jax.lax.stop_gradient(reference_points_unact)

        attention_mask, num_slots = None, 0
        if denoising is not None:
            # denoising queries go first, as in transformers: (batch, slots + queries, ...)
            num_slots = denoising.num_slots
            dn_target = self.denoising_class_embed(denoising.labels)
            # nn.Embedding(padding_idx=num_labels): the padding row gets no gradient
            is_pad = (denoising.labels == cfg.num_labels)[..., None]
            dn_target = jnp.where(is_pad, jax.lax.stop_gradient(dn_target), dn_target).astype(target.dtype)
            target = jnp.concatenate([dn_target, target], axis=1)
            dn_boxes = jax.lax.stop_gradient(denoising.boxes_unact).astype(init_reference_points.dtype)
            init_reference_points = jnp.concatenate([dn_boxes, init_reference_points], axis=1)
            attention_mask = denoising.attention_mask

        dec = self.decoder(target, init_reference_points, memory, spatial_shapes, attention_mask)
        dn_logits = dn_boxes = None
        if denoising is not None:
            split = lambda a: (a[:, :, :num_slots], a[:, :, num_slots:])  # noqa: E731
            dn_logits, dec["intermediate_logits"] = split(dec["intermediate_logits"])
            dn_boxes, dec["intermediate_reference_points"] = split(dec["intermediate_reference_points"])
            _, dec["intermediate_hidden_states"] = split(dec["intermediate_hidden_states"])
            dec["last_hidden_state"] = dec["last_hidden_state"][:, num_slots:]
            init_reference_points = init_reference_points[:, num_slots:]
        return RTDetrV2ObjectDetectionOutput(
            logits=dec["intermediate_logits"][:, -1].astype(fdtype),
            pred_boxes=dec["intermediate_reference_points"][:, -1],
            last_hidden_state=dec["last_hidden_state"],
            intermediate_hidden_states=dec["intermediate_hidden_states"],
            intermediate_logits=dec["intermediate_logits"],
            intermediate_reference_points=dec["intermediate_reference_points"],
            init_reference_points=init_reference_points,
            enc_topk_logits=enc_topk_logits,
            enc_topk_bboxes=enc_topk_bboxes,
            enc_outputs_class=enc_outputs_class,
            enc_outputs_coord_logits=enc_outputs_coord_logits,
            encoder_last_hidden_state=tuple(jnp.transpose(m, (0, 3, 1, 2)) for m in encoded),
            dn_intermediate_logits=None if dn_logits is None else dn_logits.astype(fdtype),
            dn_intermediate_reference_points=dn_boxes,
            denoising=denoising,
        )


class RTDetrV2Detector(nn.Module):
    """Top-level module; variables live under `model` like transformers' `RTDetrV2ForObjectDetection`."""

    config: RTDetrV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, denoising: DenoisingQueries | None = None):
        return RTDetrV2Model(self.config, self.dtype, name="model")(pixel_values, denoising)
