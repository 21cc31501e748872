"""Real-looking synthetic test images: smooth gradients, coloured shapes, texture. Deterministic per seed."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def synthetic_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / (7 + 20 * rng.random()) + rng.random() * 6),
            128 + 100 * np.cos(yy / (9 + 20 * rng.random()) + rng.random() * 6),
            128 + 100 * np.sin((xx + yy) / (11 + 20 * rng.random())),
        ],
        -1,
    )
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        x1 = int(min(width - 1, x0 + rng.integers(8, max(9, width // 2))))
        y1 = int(min(height - 1, y0 + rng.integers(8, max(9, height // 2))))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([int(x0), int(y0), x1, y1], fill=color)
        else:
            draw.ellipse([int(x0), int(y0), x1, y1], fill=color)
    return img


def synthetic_batch(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(batch, 3, height, width) float32 in [0, 1], the transformers pixel_values layout."""
    arrays = [np.asarray(synthetic_image(height, width, seed + i), np.float32) / 255.0 for i in range(batch)]
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()
