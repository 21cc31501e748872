"""Config: transformers config.json round trip, presets, per-level points, and errors."""

import json

import pytest
from conftest import r18vd_config, tiny_config

from rtdetr_jax import PRESETS, ConfigError, RTDetrV2Config


def test_transformers_config_json_round_trip(tmp_path):
    from transformers import RTDetrV2Config as TorchConfig

    tconf = r18vd_config(decoder_method="discrete")
    tconf.save_pretrained(tmp_path / "t")
    ours = RTDetrV2Config.from_json_file(tmp_path / "t" / "config.json")
    assert ours.backbone_config.depths == [2, 2, 2, 2] and ours.backbone_config.layer_type == "basic"
    assert ours.num_labels == 80 and ours.decoder_layers == 3 and ours.decoder_method == "discrete"
    ours.save_pretrained(tmp_path / "o")
    back = TorchConfig.from_pretrained(tmp_path / "o")
    original = json.loads((tmp_path / "t" / "config.json").read_text())
    rewritten = json.loads((tmp_path / "o" / "config.json").read_text())
    for key, value in original.items():
        if key not in ("transformers_version", "backbone_config"):
            assert rewritten[key] == value, key
    assert back.to_dict()["backbone_config"]["depths"] == [2, 2, 2, 2]
    assert back.decoder_layers == 3 and back.num_labels == 80


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_valid_configs(name):
    config = RTDetrV2Config.from_preset(name)
    assert config.encoder_in_channels == config.backbone_config.out_channels
    assert RTDetrV2Config.from_dict(json.loads(config.to_json_string())) == config


def test_r18vd_preset_matches_transformers_layout():
    ours = RTDetrV2Config.from_preset("r18vd").to_dict()
    theirs = r18vd_config().to_dict()
    for key in ("encoder_in_channels", "hidden_expansion", "decoder_layers", "d_model", "num_queries"):
        assert ours[key] == theirs[key], key


def test_per_level_points():
    config = RTDetrV2Config.from_preset("r18vd", decoder_n_points=[3, 4, 2])
    assert config.decoder_n_points_list == (3, 4, 2)
    assert RTDetrV2Config.from_dict(config.to_dict()).decoder_n_points == [3, 4, 2]
    with pytest.raises(ConfigError, match="decoder_n_points"):
        RTDetrV2Config.from_preset("r18vd", decoder_n_points=[3, 4])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(decoder_method="nearest"), "decoder_method"),
        (dict(d_model=250), "decoder_attention_heads"),
        (dict(encoder_in_channels=[1, 2, 3]), "encoder_in_channels"),
        (dict(activation_function="mish"), "activation_function"),
        (dict(id2label={}), "id2label"),
    ],
)
def test_bad_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RTDetrV2Config.from_preset("r18vd", **overrides)


def test_bad_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        RTDetrV2Config.from_json_file(bad)
    bad.write_text(json.dumps({"model_type": "detr"}))
    with pytest.raises(ConfigError, match="model_type='detr'"):
        RTDetrV2Config.from_json_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        RTDetrV2Config.from_json_file(tmp_path / "missing.json")
    assert tiny_config() is not None
