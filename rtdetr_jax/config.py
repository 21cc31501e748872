"""RT-DETRv2 configuration, field for field compatible with transformers' `RTDetrV2Config`.

A `config.json` written by transformers (`RTDetrV2Config.save_pretrained`) loads here unchanged, and the json we
write loads in transformers. Keys we do not model (e.g. `transformers_version`, `architectures`) are kept in
`extra` and written back, so a round trip loses nothing.

Beyond transformers: `decoder_n_points` may be a list with one entry per decoder feature level (the paper's
"selective multi-scale feature extraction", arXiv 2407.17140 section 3.1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

_ACTIVATIONS = ("relu", "gelu", "silu", "swish", "gelu_new", "tanh", "sigmoid", "identity")


class ConfigError(ValueError):
    """A config field has a value this library cannot build a model from."""


@dataclass
class RTDetrResNetConfig:
    """ResNet-vd backbone config (transformers' `RTDetrResNetConfig`)."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    out_indices: list[int] = field(default_factory=lambda: [2, 3, 4])
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "rt_detr_resnet"

    def __post_init__(self):
        self.hidden_sizes = [int(h) for h in self.hidden_sizes]
        self.depths = [int(d) for d in self.depths]
        self.out_indices = [int(i) for i in self.out_indices]
        self.validate()

    def validate(self):
        if self.layer_type not in ("basic", "bottleneck"):
            raise ConfigError(f"backbone_config.layer_type={self.layer_type!r} is not one of 'basic', 'bottleneck'")
        if len(self.hidden_sizes) != len(self.depths):
            raise ConfigError(
                f"backbone_config.hidden_sizes has {len(self.hidden_sizes)} entries but depths has {len(self.depths)}"
            )
        if any(i < 1 or i > len(self.depths) for i in self.out_indices):
            raise ConfigError(
                f"backbone_config.out_indices={self.out_indices} must name stages 1..{len(self.depths)}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"backbone_config.hidden_act={self.hidden_act!r} is not one of {_ACTIVATIONS}")

    @property
    def out_channels(self) -> list[int]:
        """Channels of the feature maps handed to the encoder (one per out index)."""
        return [self.hidden_sizes[i - 1] for i in self.out_indices]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = copy.deepcopy(getattr(self, f.name))
        d["model_type"] = self.model_type
        n = len(self.depths)
        d["stage_names"] = ["stem"] + [f"stage{i}" for i in range(1, n + 1)]
        d["out_features"] = [f"stage{i}" for i in self.out_indices]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RTDetrResNetConfig":
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"backbone_config.model_type={model_type!r}; only 'rt_detr_resnet' is supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        if kwargs.get("out_indices") is None:
            feats = d.get("out_features")
            kwargs["out_indices"] = [int(f.replace("stage", "")) for f in feats] if feats else [2, 3, 4]
        for derived in ("stage_names", "out_features"):
            d.pop(derived, None)
        return cls(**kwargs, extra=d)


@dataclass
class RTDetrV2Config:
    """RT-DETRv2 detector config. Field names, defaults and meaning follow transformers' `RTDetrV2Config`."""

    initializer_range: float = 0.01
    initializer_bias_prior_prob: float | None = None
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    backbone_config: RTDetrResNetConfig = field(default_factory=RTDetrResNetConfig)
    freeze_backbone_batch_norms: bool = True
    # hybrid encoder
    encoder_hidden_dim: int = 256
    encoder_in_channels: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    feat_strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    encoder_layers: int = 1
    encoder_ffn_dim: int = 1024
    encoder_attention_heads: int = 8
    dropout: float = 0.0
    activation_dropout: float = 0.0
    encode_proj_layers: list[int] = field(default_factory=lambda: [2])
    positional_encoding_temperature: int = 10000
    encoder_activation_function: str = "gelu"
    activation_function: str = "silu"
    eval_size: Any = None
    normalize_before: bool = False
    hidden_expansion: float = 1.0
    # decoder
    d_model: int = 256
    num_queries: int = 300
    decoder_in_channels: list[int] = field(default_factory=lambda: [256, 256, 256])
    decoder_ffn_dim: int = 1024
    num_feature_levels: int = 3
    decoder_n_points: int | list[int] = 4
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_activation_function: str = "relu"
    attention_dropout: float = 0.0
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    learn_initial_query: bool = False
    anchor_image_size: Any = None
    with_box_refine: bool = True
    is_encoder_decoder: bool = True
    # matcher and loss
    matcher_alpha: float = 0.25
    matcher_gamma: float = 2.0
    matcher_class_cost: float = 2.0
    matcher_bbox_cost: float = 5.0
    matcher_giou_cost: float = 2.0
    use_focal_loss: bool = True
    auxiliary_loss: bool = True
    focal_loss_alpha: float = 0.75
    focal_loss_gamma: float = 2.0
    weight_loss_vfl: float = 1.0
    weight_loss_bbox: float = 5.0
    weight_loss_giou: float = 2.0
    eos_coefficient: float = 1e-4
    # v2
    decoder_n_levels: int = 3
    decoder_offset_scale: float = 0.5
    decoder_method: str = "default"
    tie_word_embeddings: bool = True
    # labels
    id2label: dict[int, str] = field(default_factory=lambda: {i: f"LABEL_{i}" for i in range(80)})
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "rt_detr_v2"

    def __post_init__(self):
        if isinstance(self.backbone_config, dict):
            self.backbone_config = RTDetrResNetConfig.from_dict(self.backbone_config)
        if self.backbone_config is None:
            self.backbone_config = RTDetrResNetConfig()
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        for name in ("encoder_in_channels", "feat_strides", "encode_proj_layers", "decoder_in_channels"):
            setattr(self, name, [int(v) for v in getattr(self, name)])
        if isinstance(self.decoder_n_points, (list, tuple)):
            self.decoder_n_points = [int(p) for p in self.decoder_n_points]
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def decoder_n_points_list(self) -> tuple[int, ...]:
        """Sampling points per decoder level, always as a tuple of length `decoder_n_levels`."""
        if isinstance(self.decoder_n_points, list):
            return tuple(self.decoder_n_points)
        return tuple([self.decoder_n_points] * self.decoder_n_levels)

    def validate(self):
        """Raise `ConfigError` naming the first field that cannot build a model."""
        if self.decoder_method not in ("default", "discrete"):
            raise ConfigError(f"decoder_method={self.decoder_method!r} is not one of 'default', 'discrete'")
        if isinstance(self.decoder_n_points, list):
            if len(self.decoder_n_points) != self.decoder_n_levels:
                raise ConfigError(
                    f"decoder_n_points={self.decoder_n_points} has {len(self.decoder_n_points)} entries; "
                    f"decoder_n_levels={self.decoder_n_levels} needs one per level"
                )
        if any(p < 1 for p in self.decoder_n_points_list):
            raise ConfigError(f"decoder_n_points={self.decoder_n_points} must be >= 1 everywhere")
        if self.d_model % self.decoder_attention_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by decoder_attention_heads={self.decoder_attention_heads}"
            )
        if self.encoder_hidden_dim % self.encoder_attention_heads:
            raise ConfigError(
                f"encoder_hidden_dim={self.encoder_hidden_dim} is not divisible by "
                f"encoder_attention_heads={self.encoder_attention_heads}"
            )
        if self.encoder_hidden_dim % 4:
            raise ConfigError(f"encoder_hidden_dim={self.encoder_hidden_dim} must be divisible by 4 (2D sin-cos)")
        if len(self.encoder_in_channels) != len(self.feat_strides):
            raise ConfigError(
                f"encoder_in_channels={self.encoder_in_channels} and feat_strides={self.feat_strides} differ in length"
            )
        if self.backbone_config.out_channels != self.encoder_in_channels:
            raise ConfigError(
                f"encoder_in_channels={self.encoder_in_channels} does not match the backbone's output channels "
                f"{self.backbone_config.out_channels}"
            )
        if self.decoder_n_levels != self.num_feature_levels:
            raise ConfigError(
                f"decoder_n_levels={self.decoder_n_levels} must equal num_feature_levels={self.num_feature_levels}"
            )
        if self.num_feature_levels < len(self.decoder_in_channels):
            raise ConfigError(
                f"num_feature_levels={self.num_feature_levels} is smaller than len(decoder_in_channels)="
                f"{len(self.decoder_in_channels)}"
            )
        for name in ("activation_function", "encoder_activation_function", "decoder_activation_function"):
            if getattr(self, name) not in _ACTIVATIONS:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {_ACTIVATIONS}")
        if self.num_labels < 1:
            raise ConfigError("id2label is empty: the detector needs at least one class")
        if any(i < 0 or i >= len(self.encoder_in_channels) for i in self.encode_proj_layers):
            raise ConfigError(f"encode_proj_layers={self.encode_proj_layers} names a level that does not exist")

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict[str, Any]:
        d = copy.deepcopy(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "backbone_config", "id2label"):
                continue
            d[f.name] = copy.deepcopy(getattr(self, f.name))
        d["backbone_config"] = self.backbone_config.to_dict()
        d["id2label"] = {str(k): v for k, v in sorted(self.id2label.items())}
        d["label2id"] = {v: k for k, v in sorted(self.id2label.items())}
        d["model_type"] = self.model_type
        d.setdefault("architectures", ["RTDetrV2ForObjectDetection"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RTDetrV2Config":
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"model_type={model_type!r}; this library builds 'rt_detr_v2' models only")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        d.pop("label2id", None)
        if d.get("architectures") == ["RTDetrV2ForObjectDetection"]:
            d.pop("architectures")  # written back by to_dict
        if "id2label" not in kwargs and "num_labels" in d:
            kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(int(d.pop("num_labels")))}
        d.pop("num_labels", None)
        return cls(**kwargs, extra=d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        from rtdetr_jax.io_utils import atomic_write_text

        atomic_write_text(path, self.to_json_string())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, "config.json"))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "RTDetrV2Config":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except TypeError as err:
            raise ConfigError(f"{path}: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None) -> "RTDetrV2Config":
        from rtdetr_jax.hub import resolve_file

        return cls.from_json_file(resolve_file(name_or_path, "config.json", revision=revision))

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RTDetrV2Config":
        """One of `PRESETS` (the published RT-DETRv2 variants), with optional field overrides."""
        key = name.replace("rtdetr_v2_", "").replace("PekingU/", "")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[key])
        backbone = kwargs.pop("backbone_config")
        backbone.update(overrides.pop("backbone_config", {}) or {})
        kwargs.update(overrides)
        return cls(backbone_config=RTDetrResNetConfig(**backbone), **kwargs)


# The published variants (lyuwenyu/RT-DETR rtdetrv2_pytorch configs; transformers' conversion script).
PRESETS: dict[str, dict[str, Any]] = {
    "r18vd": dict(
        backbone_config=dict(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"),
        encoder_in_channels=[128, 256, 512],
        hidden_expansion=0.5,
        decoder_layers=3,
    ),
    "r34vd": dict(
        backbone_config=dict(hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3], layer_type="basic"),
        encoder_in_channels=[128, 256, 512],
        hidden_expansion=0.5,
        decoder_layers=4,
    ),
    "r50vd_m": dict(backbone_config=dict(), hidden_expansion=0.5),
    "r50vd": dict(backbone_config=dict()),
    "r101vd": dict(
        backbone_config=dict(depths=[3, 4, 23, 3]),
        encoder_ffn_dim=2048,
        encoder_hidden_dim=384,
        decoder_in_channels=[384, 384, 384],
    ),
}
# Not a published model: a reduced-width RT-DETRv2 for CPU demos, tests and the learning benchmark.
PRESETS["tiny"] = dict(
    backbone_config=dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                         layer_type="basic"),
    encoder_in_channels=[64, 128, 256],
    encoder_hidden_dim=64,
    encoder_ffn_dim=256,
    encoder_attention_heads=4,
    hidden_expansion=0.5,
    d_model=64,
    decoder_in_channels=[64, 64, 64],
    decoder_ffn_dim=256,
    decoder_attention_heads=4,
    decoder_layers=3,
    num_queries=60,
    num_denoising=30,
    # trained from scratch, not from ImageNet weights: the backbone's batch norms train (batch statistics)
    freeze_backbone_batch_norms=False,
)
