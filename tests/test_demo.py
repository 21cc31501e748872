"""`rtdetr-jax demo` end to end on a smoke setting: dataset written, a few training steps, COCO AP reported,
fresh images detected and drawn, the grid picture written (the full run is the README's main job)."""

from __future__ import annotations

import json
import os

from PIL import Image

from rtdetr_jax.cli import main


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--train-images", "32", "--val-images", "8", "--epochs", "1",
               "--max-steps", "3", "--image-size", "128", "--batch-size", "4", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "held-out COCO AP" in captured.out
    result = json.loads((out / "demo_result.json").read_text())
    assert result["steps"] == 3
    assert set(result["val_metrics"]) >= {"AP", "AP50", "AP75"}
    assert all(0.0 <= v <= 1.0 for v in result["val_metrics"].values())
    with open(out / "detections" / "detections.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    assert len(records) == 8
    for rec in records:
        assert (rec["width"], rec["height"]) == (320, 320)
        assert Image.open(rec["annotated"]).size == (320, 320)
    grid = Image.open(out / "demo.jpg")
    assert grid.size == (2 * 320 + 4, 2 * 320 + 4)
    # the exported model resizes to the size it was trained at
    with open(out / "run" / "model" / "preprocessor_config.json") as fh:
        assert json.load(fh)["size"] == {"height": 128, "width": 128}
    assert os.path.isfile(out / "run" / "model" / "model.safetensors")
