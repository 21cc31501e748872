"""Drawing detections on an image: a coloured box per detection with its label name and score on a filled tag.

Line width and font size scale with the image (readable on a 64 px thumbnail and on a 12000 px photo); each class
keeps one colour from a palette of well-separated hues; the tag text is black or white, whichever contrasts more
with the tag colour. Pure PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

# Tableau-20 style: distinct, saturated enough to show on photos
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
)


def colour_for(label_id: int) -> tuple[int, int, int]:
    return PALETTE[int(label_id) % len(PALETTE)]


def _text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def draw_detections(image: Image.Image, detections: Sequence[dict]) -> Image.Image:
    """A copy of `image` (converted to RGB) with `detections` drawn.

    detections: `[{"label": str, "label_id": int, "score": float, "box_xyxy": [x0, y0, x1, y1]}, ...]` in pixels.
    Lower scores are drawn first, so the most confident box and tag end up on top.
    """
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    short = max(1, min(canvas.size))
    width = max(1, round(short / 250))
    font = _font(max(10, round(short / 40)))
    pad = max(1, width)
    for det in sorted(detections, key=lambda d: d["score"]):
        colour = colour_for(det["label_id"])
        x0, y0, x1, y1 = (float(v) for v in det["box_xyxy"])
        x0, x1 = sorted((max(0.0, min(x0, canvas.width - 1)), max(0.0, min(x1, canvas.width - 1))))
        y0, y1 = sorted((max(0.0, min(y0, canvas.height - 1)), max(0.0, min(y1, canvas.height - 1))))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(x0, max(0.0, canvas.width - tw))
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the top edge
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_colour(colour), font=font)
    return canvas
