"""The notebooks run: both are executed top to bottom (nbclient, a real kernel) on small settings, offline.

inference.ipynb on a tiny checkpoint saved by transformers (its PyTorch comparison cell asserts agreement);
finetune.ipynb fine-tuning a tiny model on a generated dataset, evaluating it and checking the transformers export.
The committed notebooks must carry no outputs."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import build_reference, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute(name: str, cwd, timeout: int = 900):
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: committed with outputs"
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def has_image(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture()
def notebook_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    return monkeypatch


def test_inference_notebook(notebook_env, tmp_path):
    from rtdetr_jax.processing import RTDetrImageProcessor

    ckpt = tmp_path / "ckpt"
    build_reference(str(ckpt), tiny_config(), seed=5)
    RTDetrImageProcessor(size={"height": 160, "width": 160}).save_pretrained(str(ckpt))
    notebook_env.setenv("RTDETR_NOTEBOOK_MODEL", str(ckpt))
    notebook_env.setenv("RTDETR_NOTEBOOK_THRESHOLD", "0.2")
    nb = execute("inference.ipynb", tmp_path)
    text = outputs_text(nb)
    assert "detections on both sides" in text, text
    assert has_image(nb) >= 2  # the picture and the annotated picture


def test_finetune_notebook(notebook_env, tmp_path):
    from rtdetr_jax.config import RTDetrV2Config
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    base = tmp_path / "base"  # a "pretrained" model with other labels: the heads are re-initialised
    config = RTDetrV2Config.from_preset(
        "tiny", id2label={i: f"thing{i}" for i in range(6)}, num_queries=30, num_denoising=20, decoder_layers=2,
        backbone_config=dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128]), encoder_in_channels=[32, 64, 128],
        encoder_hidden_dim=32, d_model=32, decoder_in_channels=[32] * 3, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2)
    RTDetrV2ForObjectDetection(config).save_pretrained(str(base))
    for key, value in dict(BASE_MODEL=str(base), WORKDIR=str(tmp_path / "work"), IMAGE_SIZE="128",
                           TRAIN_IMAGES="16", EPOCHS="1", BATCH_SIZE="4", MAX_BOXES="8", MAX_STEPS="3").items():
        notebook_env.setenv("RTDETR_NOTEBOOK_" + key, value)
    nb = execute("finetune.ipynb", tmp_path)
    text = outputs_text(nb)
    assert "transformers loads the export" in text, text
    assert "'AP50'" in text
    assert os.path.isfile(tmp_path / "work" / "run" / "model" / "model.safetensors")
    assert has_image(nb) >= 2
