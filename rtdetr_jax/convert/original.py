"""The authors' checkpoints (lyuwenyu/RT-DETR `rtdetrv2_pytorch`, files `rtdetrv2_*.pth`) -> transformers keys.

The file is a pickled dict whose weights sit under `ema` -> `module` (EMA weights, preferred) or `model`. It is read
only through `torch.load(weights_only=True)`, which refuses arbitrary pickled code; torch is needed for this path
alone. Key renaming follows transformers' `convert_rt_detr_v2_weights_to_hf.py`; fused attention `in_proj` matrices
are split into q/k/v. The result goes through the same strict converter as a transformers checkpoint.
"""

from __future__ import annotations

import os
import re

import numpy as np

from rtdetr_jax.convert.transformers import ConversionError

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# (pattern, replacement) applied in order; the first match wins.
_RULES: list[tuple[str, str]] = [
    # backbone stem and stages
    (r"^backbone\.conv1\.conv1_(\d)\.conv\.weight$", lambda m: f"model.backbone.model.embedder.embedder.{int(m[1]) - 1}.convolution.weight"),
    (rf"^backbone\.conv1\.conv1_(\d)\.norm\.{_BN}$", lambda m: f"model.backbone.model.embedder.embedder.{int(m[1]) - 1}.normalization.{m[2]}"),
    (r"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.conv\.weight$", lambda m: f"model.backbone.model.encoder.stages.{m[1]}.layers.{m[2]}.layer.{'abc'.index(m[3])}.convolution.weight"),
    (rf"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.norm\.{_BN}$", lambda m: f"model.backbone.model.encoder.stages.{m[1]}.layers.{m[2]}.layer.{'abc'.index(m[3])}.normalization.{m[4]}"),
    (r"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.short\.conv\.conv\.weight$", lambda m: f"model.backbone.model.encoder.stages.{m[1]}.layers.{m[2]}.shortcut.1.convolution.weight"),
    (rf"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.short\.conv\.norm\.{_BN}$", lambda m: f"model.backbone.model.encoder.stages.{m[1]}.layers.{m[2]}.shortcut.1.normalization.{m[3]}"),
    (r"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.short\.conv\.weight$", lambda m: f"model.backbone.model.encoder.stages.{m[1]}.layers.{m[2]}.shortcut.convolution.weight"),
    (rf"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.short\.norm\.{_BN}$", lambda m: f"model.backbone.model.encoder.stages.{m[1]}.layers.{m[2]}.shortcut.normalization.{m[3]}"),
    # encoder
    (r"^encoder\.input_proj\.(\d+)\.conv\.weight$", lambda m: f"model.encoder_input_proj.{m[1]}.0.weight"),
    (rf"^encoder\.input_proj\.(\d+)\.norm\.{_BN}$", lambda m: f"model.encoder_input_proj.{m[1]}.1.{m[2]}"),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.linear([12])\.(weight|bias)$", lambda m: f"model.encoder.encoder.{m[1]}.layers.{m[2]}.fc{m[3]}.{m[4]}"),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm1\.(weight|bias)$", lambda m: f"model.encoder.encoder.{m[1]}.layers.{m[2]}.self_attn_layer_norm.{m[3]}"),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm2\.(weight|bias)$", lambda m: f"model.encoder.encoder.{m[1]}.layers.{m[2]}.final_layer_norm.{m[3]}"),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", lambda m: f"model.encoder.encoder.{m[1]}.layers.{m[2]}.self_attn.out_proj.{m[3]}"),
    (r"^encoder\.((?:fpn_blocks|pan_blocks|lateral_convs|downsample_convs)\..+)$", lambda m: f"model.encoder.{m[1]}"),
    # decoder
    (r"^decoder\.input_proj\.(\d+)\.conv\.weight$", lambda m: f"model.decoder_input_proj.{m[1]}.0.weight"),
    (rf"^decoder\.input_proj\.(\d+)\.norm\.{_BN}$", lambda m: f"model.decoder_input_proj.{m[1]}.1.{m[2]}"),
    (r"^decoder\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", lambda m: f"model.decoder.layers.{m[1]}.self_attn.out_proj.{m[2]}"),
    (r"^decoder\.decoder\.layers\.(\d+)\.cross_attn\.num_points_scale$", lambda m: f"model.decoder.layers.{m[1]}.encoder_attn.n_points_scale"),
    (r"^decoder\.decoder\.layers\.(\d+)\.cross_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$", lambda m: f"model.decoder.layers.{m[1]}.encoder_attn.{m[2]}.{m[3]}"),
    (r"^decoder\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)$", lambda m: f"model.decoder.layers.{m[1]}.self_attn_layer_norm.{m[2]}"),
    (r"^decoder\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)$", lambda m: f"model.decoder.layers.{m[1]}.encoder_attn_layer_norm.{m[2]}"),
    (r"^decoder\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)$", lambda m: f"model.decoder.layers.{m[1]}.final_layer_norm.{m[2]}"),
    (r"^decoder\.decoder\.layers\.(\d+)\.linear([12])\.(weight|bias)$", lambda m: f"model.decoder.layers.{m[1]}.fc{m[2]}.{m[3]}"),
    (r"^decoder\.dec_score_head\.(\d+)\.(weight|bias)$", lambda m: f"model.decoder.class_embed.{m[1]}.{m[2]}"),
    (r"^decoder\.dec_bbox_head\.(\d+)\.layers\.(\d+)\.(weight|bias)$", lambda m: f"model.decoder.bbox_embed.{m[1]}.layers.{m[2]}.{m[3]}"),
    (r"^decoder\.denoising_class_embed\.weight$", lambda m: "model.denoising_class_embed.weight"),
    (r"^decoder\.tgt_embed\.weight$", lambda m: "model.weight_embedding.weight"),
    (r"^decoder\.query_pos_head\.layers\.(\d+)\.(weight|bias)$", lambda m: f"model.decoder.query_pos_head.layers.{m[1]}.{m[2]}"),
    (r"^decoder\.enc_output\.proj\.(weight|bias)$", lambda m: f"model.enc_output.0.{m[1]}"),
    (r"^decoder\.enc_output\.norm\.(weight|bias)$", lambda m: f"model.enc_output.1.{m[1]}"),
    (r"^decoder\.enc_score_head\.(weight|bias)$", lambda m: f"model.enc_score_head.{m[1]}"),
    (r"^decoder\.enc_bbox_head\.layers\.(\d+)\.(weight|bias)$", lambda m: f"model.enc_bbox_head.layers.{m[1]}.{m[2]}"),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]
_IN_PROJ = re.compile(r"^(encoder\.encoder\.(\d+)\.layers\.(\d+)|decoder\.decoder\.layers\.(\d+))\.self_attn\.in_proj_(weight|bias)$")
# buffers the original model registers that carry nothing a converted model needs
_DROPPED = re.compile(r"^decoder\.(anchors|valid_mask)$")


def original_to_transformers(state: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Rename an original RT-DETRv2 state dict to transformers keys. Unknown keys are an error naming them."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        value = np.asarray(value)
        m = _IN_PROJ.match(key)
        if m:
            prefix = (f"model.encoder.encoder.{m[2]}.layers.{m[3]}" if m[2] is not None
                      else f"model.decoder.layers.{m[4]}")
            if value.shape[0] % 3:
                raise ConversionError(f"{source}: key {key!r} has shape {value.shape}; first dim must split in 3")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{prefix}.self_attn.{name}.{m[5]}"] = np.ascontiguousarray(part)
            continue
        if _DROPPED.match(key):
            continue
        for pattern, repl in _COMPILED:
            mm = pattern.match(key)
            if mm:
                out[repl(mm)] = value
                break
        else:
            raise ConversionError(f"{source}: key {key!r} is not part of an RT-DETRv2 checkpoint")
    return out


def load_original_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read `rtdetrv2_*.pth` safely and return its weights under transformers' key names."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading .pth checkpoints needs PyTorch (pip install torch); safetensors needs nothing extra"
        ) from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True) ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    state = ckpt
    if isinstance(ckpt, dict) and "ema" in ckpt:
        state = ckpt["ema"]
        state = state.get("module", state) if isinstance(state, dict) else state
    elif isinstance(ckpt, dict) and "model" in ckpt:
        state = ckpt["model"]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConversionError(f"{path}: no state dict found under 'ema'/'module', 'model' or at the top level")
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
    return original_to_transformers(arrays, source=path)
