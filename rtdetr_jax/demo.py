"""`rtdetr-jax demo`: the whole library in one command, with no network and no downloaded weights.

1. writes the synthetic shapes dataset (`data/synthetic.py`: coloured shapes on textured backgrounds, COCO format);
2. trains the small `tiny` RT-DETRv2 preset on it on the CPU (a few minutes, progress bar);
3. scores the EMA weights on the held-out split with COCO mAP (pycocotools);
4. detects on freshly generated images (never seen in training) and writes annotated pictures plus a 2x2 grid.

Everything lands in `out_dir`: `shapes/` (dataset), `run/` (log, checkpoints, `model/`), `fresh/` (new images),
`detections/` (annotated copies + `detections.jsonl`), `demo.jpg` (the grid) and `demo_result.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from PIL import Image

from rtdetr_jax.io_utils import atomic_path, atomic_write_text


@dataclasses.dataclass
class DemoOptions:
    out_dir: str = "demo"
    train_images: int = 960
    val_images: int = 128
    image_size: int = 160  # training / model input size
    fresh_images: int = 8
    fresh_size: int = 320  # the new pictures are drawn larger, then resized to image_size by the processor
    epochs: int = 6
    batch_size: int = 16
    learning_rate: float = 1e-3
    max_steps: int | None = None
    seed: int = 0
    threshold: float = 0.5
    progress: bool = True


def _write_fresh_images(folder: str, count: int, size: int, seed: int) -> list[str]:
    from rtdetr_jax.data.synthetic import make_image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, 7919])  # a stream the dataset splits never use
    paths = []
    for i in range(count):
        image, _ = make_image(rng, size)
        path = os.path.join(folder, f"fresh_{i:02d}.jpg")
        with atomic_path(path) as tmp:
            image.save(tmp, format="JPEG", quality=92)
        paths.append(path)
    return paths


def _grid(paths: list[str], out_path: str, tile: int = 320) -> None:
    """Up to four annotated pictures tiled 2x2 (the README's demo picture)."""
    tiles = [Image.open(p).convert("RGB").resize((tile, tile), Image.BILINEAR) for p in paths[:4]]
    cols = 2 if len(tiles) > 1 else 1
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * tile + (cols - 1) * 4, rows * tile + (rows - 1) * 4), (255, 255, 255))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * (tile + 4), (k // cols) * (tile + 4)))
    with atomic_path(out_path) as tmp:
        grid.save(tmp, format="JPEG", quality=85)


def run_demo(options: DemoOptions) -> dict:
    from rtdetr_jax.data.synthetic import write_shapes_dataset
    from rtdetr_jax.detect import DetectOptions, detect_files
    from rtdetr_jax.train.loop import TrainConfig, fit

    out = options.out_dir
    t0 = time.perf_counter()
    data = os.path.join(out, "shapes")
    write_shapes_dataset(data, train=options.train_images, val=options.val_images, size=options.image_size,
                         seed=options.seed)
    cfg = TrainConfig(
        data_dir=data, output_dir=os.path.join(out, "run"), config="tiny", epochs=options.epochs,
        max_steps=options.max_steps, batch_size=options.batch_size, image_size=options.image_size, max_boxes=8,
        # no strong augmentation (zoom-out, IoU crop): the fresh test pictures come from the training distribution,
        # and on this budget the strong augmentations slow learning down several times over (bench_learning.py)
        no_aug_epochs=options.epochs, learning_rate=options.learning_rate, backbone_lr_multiplier=1.0,
        warmup_steps=min(100, max(1, options.epochs * options.train_images // options.batch_size // 5)),
        ema_decay=0.99, ema_warmup_steps=100, save_every=10**9, eval_every=options.epochs, log_every=10,
        seed=options.seed, progress=options.progress,
    )
    summary = fit(cfg)
    t_train = time.perf_counter() - t0
    fresh = _write_fresh_images(os.path.join(out, "fresh"), options.fresh_images, options.fresh_size, options.seed)
    records = detect_files([os.path.join(out, "fresh")], DetectOptions(
        model=summary["model_dir"], out_dir=os.path.join(out, "detections"), threshold=options.threshold,
        batch_size=min(8, len(fresh)), progress=False))
    _grid([r["annotated"] for r in records], os.path.join(out, "demo.jpg"))
    result = {
        "val_metrics": summary["eval"],
        "steps": summary["steps"],
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "model_dir": summary["model_dir"],
        "detections": os.path.join(out, "detections", "detections.jsonl"),
        "grid": os.path.join(out, "demo.jpg"),
        "settings": dataclasses.asdict(options),
    }
    atomic_write_text(os.path.join(out, "demo_result.json"), json.dumps(result, indent=2) + "\n")
    result["records"] = records
    return result
