"""A small synthetic detection dataset in COCO format: coloured shapes on textured backgrounds.

Used by the demo, the learning benchmark and the tests; needs no download. Layout written by `write_shapes_dataset`:

    DIR/annotations/instances_train.json   DIR/train/000000.jpg ...
    DIR/annotations/instances_val.json     DIR/val/000000.jpg ...
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rtdetr_jax.io_utils import atomic_path, atomic_write_text

CLASSES = ("circle", "square", "triangle", "diamond")


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour noise plus stripes: enough texture that a shape is not found by brightness alone."""
    coarse = rng.uniform(40, 215, size=(6, 6, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    arr += stripes[..., None] * rng.uniform(5, 25)
    arr += rng.normal(0, 6, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, kind: str, box, colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def make_image(rng: np.random.Generator, size: int, max_objects: int = 4, min_size: float = 0.12,
               max_size: float = 0.4):
    """One image and its annotations `[(class_index, [x, y, w, h]), ...]` in pixels."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            side = rng.uniform(min_size, max_size) * size
            w = side * rng.uniform(0.8, 1.25)
            h = side * rng.uniform(0.8, 1.25)
            x0 = rng.uniform(0, size - w)
            y0 = rng.uniform(0, size - h)
            box = (x0, y0, x0 + w, y0 + h)
            # keep shapes apart so every box is fully visible
            if all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3] for p in placed):
                break
        else:
            continue
        cls = int(rng.integers(len(CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw(draw, CLASSES[cls], box, colour)
        placed.append(box)
        objects.append((cls, [round(box[0], 2), round(box[1], 2), round(w, 2), round(h, 2)]))
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    return img, objects


def write_split(folder: str, split: str, count: int, size: int, seed: int) -> str:
    """Write `count` images and `annotations/instances_{split}.json`; returns the annotation path."""
    image_dir = os.path.join(folder, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    images, annotations = [], []
    for i in range(count):
        img, objects = make_image(rng, size)
        name = f"{i:06d}.jpg"
        with atomic_path(os.path.join(image_dir, name)) as tmp:
            img.save(tmp, format="JPEG", quality=92)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for cls, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0})
    coco = {
        "info": {"description": f"rtdetr-jax synthetic shapes ({split})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    path = os.path.join(folder, "annotations", f"instances_{split}.json")
    atomic_write_text(path, json.dumps(coco))
    return path


def write_shapes_dataset(folder: str, train: int = 512, val: int = 64, size: int = 256, seed: int = 0) -> dict:
    """Write both splits; returns {split: annotation path}."""
    return {
        "train": write_split(folder, "train", train, size, seed),
        "val": write_split(folder, "val", val, size, seed),
    }
