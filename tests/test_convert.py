"""Converter: strict key checks, bit-exact round trip, reverse conversion loaded by transformers, sharded
checkpoints, the authors' .pth layout, non-uniform points, and the port CLI."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_reference, tiny_config, torch_forward
from safetensors.numpy import load_file, save_file

from rtdetr_jax import ConversionError, RTDetrV2Config, RTDetrV2ForObjectDetection
from rtdetr_jax.convert.original import load_original_checkpoint
from rtdetr_jax.convert.transformers import load_transformers_checkpoint, variables_to_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    model = build_reference(folder, tiny_config(), seed=2)
    return folder, model


def _config(folder):
    return RTDetrV2Config.from_json_file(os.path.join(folder, "config.json"))


def test_round_trip_is_bit_exact(reference_dir):
    folder, _ = reference_dir
    original = load_file(os.path.join(folder, "model.safetensors"))
    variables = load_transformers_checkpoint(os.path.join(folder, "model.safetensors"), _config(folder))
    back = variables_to_state_dict(variables, _config(folder))
    floats = {k for k, v in original.items() if v.dtype.kind == "f"}
    assert floats == {k for k, v in back.items() if v.dtype.kind == "f"}
    for key in floats:
        assert np.array_equal(original[key], back[key]), key
    assert set(original) == set(back)  # num_batches_tracked counters are written back too


def test_reverse_conversion_loads_in_transformers(reference_dir, tmp_path, images_2x96x128):
    from transformers import RTDetrV2ForObjectDetection as TorchModel

    folder, reference = reference_dir
    ours = RTDetrV2ForObjectDetection.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "export")
    reloaded = TorchModel.from_pretrained(tmp_path / "export").eval()
    a = torch_forward(reference, images_2x96x128)
    b = torch_forward(reloaded, images_2x96x128)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    assert sorted(os.listdir(tmp_path / "export")) == [
        "config.json", "flax_model.msgpack", "model.safetensors", "preprocessor_config.json"]


def _write(state, folder, name="model.safetensors"):
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, name))
    return os.path.join(folder, name)


def test_strict_errors_name_the_key(reference_dir, tmp_path):
    folder, _ = reference_dir
    config = _config(folder)
    state = load_file(os.path.join(folder, "model.safetensors"))

    extra = dict(state, **{"model.decoder.surprise.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="unexpected key 'model.decoder.surprise.weight'"):
        load_transformers_checkpoint(_write(extra, tmp_path / "a"), config)

    missing = {k: v for k, v in state.items() if k != "model.enc_score_head.bias"}
    with pytest.raises(ConversionError, match="missing key 'model.enc_score_head.bias'"):
        load_transformers_checkpoint(_write(missing, tmp_path / "b"), config)

    reshaped = dict(state, **{"model.enc_score_head.bias": np.zeros(7, np.float32)})
    with pytest.raises(ConversionError, match=r"'model.enc_score_head.bias' has shape \(7,\), the config expects \(5,\)"):
        load_transformers_checkpoint(_write(reshaped, tmp_path / "c"), config)

    tied = dict(state, **{"class_embed.0.bias": state["model.decoder.class_embed.0.bias"] + 1})
    with pytest.raises(ConversionError, match="tied key 'class_embed.0.bias' differs"):
        load_transformers_checkpoint(_write(tied, tmp_path / "d"), config)

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match="cannot read as safetensors"):
        load_transformers_checkpoint(tmp_path / "e" / "model.safetensors", config)


def test_checkpoint_for_another_architecture(reference_dir, tmp_path):
    folder, _ = reference_dir
    other = RTDetrV2Config.from_preset("r18vd")
    with pytest.raises(ConversionError, match="shape|missing|unexpected"):
        load_transformers_checkpoint(os.path.join(folder, "model.safetensors"), other)


def test_tied_duplicates_are_accepted(reference_dir, tmp_path):
    folder, _ = reference_dir
    state = load_file(os.path.join(folder, "model.safetensors"))
    with_copies = dict(state)
    for key, value in state.items():
        if key.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed.")):
            with_copies[key.replace("model.decoder.", "")] = value
    variables = load_transformers_checkpoint(_write(with_copies, tmp_path), _config(folder))
    assert variables["params"]["model"]["decoder"]["class_embed_0"]["bias"].shape == (5,)


def test_sharded_checkpoint(reference_dir, tmp_path):
    folder, _ = reference_dir
    state = load_file(os.path.join(folder, "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        _write({k: state[k] for k in shard_keys}, tmp_path, name)
        weight_map.update({k: name for k in shard_keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    a = RTDetrV2ForObjectDetection.from_pretrained(tmp_path)
    b = RTDetrV2ForObjectDetection.from_pretrained(folder, )
    for x, y in zip(*(jax_leaves(m.variables) for m in (a, b))):
        assert np.array_equal(x, y)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def to_original_layout(state, config):
    """Independent renaming of transformers keys to the authors' layout (as their rtdetrv2_pytorch names them)."""
    out = {}
    qkv = {}
    for key, value in state.items():
        k = key
        if k.endswith("num_batches_tracked"):
            continue
        if ".self_attn." in k and any(p in k for p in ("q_proj", "k_proj", "v_proj")):
            qkv[k] = value
            continue
        in_backbone = k.startswith("model.backbone")
        for a, b in [
            ("model.backbone.model.embedder.embedder.0.convolution", "backbone.conv1.conv1_1.conv"),
            ("model.backbone.model.embedder.embedder.1.convolution", "backbone.conv1.conv1_2.conv"),
            ("model.backbone.model.embedder.embedder.2.convolution", "backbone.conv1.conv1_3.conv"),
            ("model.backbone.model.embedder.embedder.0.normalization", "backbone.conv1.conv1_1.norm"),
            ("model.backbone.model.embedder.embedder.1.normalization", "backbone.conv1.conv1_2.norm"),
            ("model.backbone.model.embedder.embedder.2.normalization", "backbone.conv1.conv1_3.norm"),
            ("model.backbone.model.encoder.stages.", "backbone.res_layers."),
            (".layers.", ".blocks."),
            (".layer.0.convolution", ".branch2a.conv"), (".layer.0.normalization", ".branch2a.norm"),
            (".layer.1.convolution", ".branch2b.conv"), (".layer.1.normalization", ".branch2b.norm"),
            (".layer.2.convolution", ".branch2c.conv"), (".layer.2.normalization", ".branch2c.norm"),
            (".shortcut.1.convolution", ".short.conv.conv"), (".shortcut.1.normalization", ".short.conv.norm"),
            (".shortcut.convolution", ".short.conv"), (".shortcut.normalization", ".short.norm"),
        ]:
            if in_backbone:
                k = k.replace(a, b)
        m = re.match(r"^model\.(encoder|decoder)_input_proj\.(\d+)\.([01])\.(\w+)$", k)
        if m:
            k = f"{m[1]}.input_proj.{m[2]}." + ("conv.weight" if m[3] == "0" else f"norm.{m[4]}")
        elif k.startswith("model.encoder.encoder."):
            k = (k.replace("model.encoder.encoder.", "encoder.encoder.").replace(".fc1.", ".linear1.")
                 .replace(".fc2.", ".linear2.").replace(".self_attn_layer_norm.", ".norm1.")
                 .replace(".final_layer_norm.", ".norm2."))
        elif k.startswith("model.encoder."):
            k = k.replace("model.encoder.", "encoder.")
        elif k.startswith("model.decoder.layers."):
            k = (k.replace("model.decoder.layers.", "decoder.decoder.layers.").replace(".encoder_attn.n_points_scale", ".cross_attn.num_points_scale")
                 .replace(".encoder_attn.", ".cross_attn.").replace(".self_attn_layer_norm.", ".norm1.")
                 .replace(".encoder_attn_layer_norm.", ".norm2.").replace(".final_layer_norm.", ".norm3.")
                 .replace(".fc1.", ".linear1.").replace(".fc2.", ".linear2."))
        elif k.startswith("model.decoder.class_embed."):
            k = k.replace("model.decoder.class_embed.", "decoder.dec_score_head.")
        elif k.startswith("model.decoder.bbox_embed."):
            k = k.replace("model.decoder.bbox_embed.", "decoder.dec_bbox_head.")
        elif k.startswith("model.decoder.query_pos_head."):
            k = k.replace("model.decoder.", "decoder.")
        elif k.startswith("model.enc_output.0."):
            k = k.replace("model.enc_output.0.", "decoder.enc_output.proj.")
        elif k.startswith("model.enc_output.1."):
            k = k.replace("model.enc_output.1.", "decoder.enc_output.norm.")
        elif k.startswith(("model.enc_score_head.", "model.enc_bbox_head.", "model.denoising_class_embed.")):
            k = k.replace("model.", "decoder.")
        out[k] = value
    for key in [k for k in qkv if "q_proj" in k]:
        parts = [qkv[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
        prefix = key[: key.index(".self_attn.")]
        prefix = prefix.replace("model.encoder.encoder.", "encoder.encoder.").replace("model.decoder.layers.",
                                                                                      "decoder.decoder.layers.")
        out[f"{prefix}.self_attn.in_proj_{key.rsplit('.', 1)[1]}"] = np.concatenate(parts, 0)
    out["decoder.anchors"] = np.zeros((1, 4, 4), np.float32)
    out["decoder.valid_mask"] = np.ones((1, 4, 1), bool)
    return out


def test_original_pth_checkpoint(reference_dir, tmp_path, images_2x96x128):
    folder, _ = reference_dir
    state = load_file(os.path.join(folder, "model.safetensors"))
    original = to_original_layout(state, _config(folder))
    pth = tmp_path / "rtdetrv2_tiny.pth"
    torch.save({"ema": {"module": {k: torch.from_numpy(np.array(v)) for k, v in original.items()}}}, pth)
    renamed = load_original_checkpoint(pth)
    floats = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert set(renamed) == set(floats)
    for key, value in floats.items():
        assert np.array_equal(renamed[key], value), key

    out = tmp_path / "ported"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "port_torch_weights.py"), str(pth),
                             "--out", str(out), "--config", os.path.join(folder, "config.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ported = RTDetrV2ForObjectDetection.from_pretrained(out)
    direct = RTDetrV2ForObjectDetection.from_pretrained(folder)
    np.testing.assert_array_equal(np.asarray(ported(pixel_values=images_2x96x128).logits),
                                  np.asarray(direct(pixel_values=images_2x96x128).logits))

    torch.save({"model": {"backbone.nonsense.weight": torch.zeros(2)}}, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match="'backbone.nonsense.weight' is not part of an RT-DETRv2"):
        load_original_checkpoint(tmp_path / "bad.pth")
    (tmp_path / "pickle.pth").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match=r"pickle.pth: cannot load with torch.load\(weights_only=True\)"):
        load_original_checkpoint(tmp_path / "pickle.pth")


def test_uniform_point_list_equals_int(reference_dir, images_2x96x128):
    folder, _ = reference_dir
    config = _config(folder)
    listed = RTDetrV2Config.from_dict(dict(config.to_dict(), decoder_n_points=[4, 4, 4]))
    a = RTDetrV2ForObjectDetection.from_pretrained(folder)
    b = RTDetrV2ForObjectDetection.from_pretrained(folder, config=listed)
    np.testing.assert_array_equal(np.asarray(a(pixel_values=images_2x96x128).logits),
                                  np.asarray(b(pixel_values=images_2x96x128).logits))
    mismatched = RTDetrV2Config.from_dict(dict(config.to_dict(), decoder_n_points=[2, 4, 6]))
    with pytest.raises(ConversionError, match="n_points_scale"):
        RTDetrV2ForObjectDetection.from_pretrained(folder, config=mismatched)


def test_non_uniform_points_model_runs_and_round_trips(tmp_path, images_2x96x128):
    config = RTDetrV2Config.from_dict(dict(tiny_config().to_dict(), decoder_n_points=[2, 4, 3]))
    model = RTDetrV2ForObjectDetection(config, seed=3)
    out = model(pixel_values=images_2x96x128)
    assert np.isfinite(np.asarray(out.logits)).all()
    offsets = model.params["model"]["decoder"]["layers_0"]["encoder_attn"]["sampling_offsets"]["kernel"]
    assert offsets.shape == (32, 2 * 9 * 2)  # heads * (2 + 4 + 3) points * (x, y)
    model.save_pretrained(tmp_path)
    again = RTDetrV2ForObjectDetection.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(again(pixel_values=images_2x96x128).logits), np.asarray(out.logits))


def test_port_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "rtdetr_jax", "port", *args], capture_output=True, text=True)

    r = run(str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o"), "--config", "r18vd")
    assert r.returncode == 2 and "nope.pth: no such file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = run(str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = run(str(tmp_path / "x.pth"), "--out", str(tmp_path / "o"), "--config", "r99")
    assert r.returncode == 2 and "unknown preset 'r99'" in r.stderr
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
