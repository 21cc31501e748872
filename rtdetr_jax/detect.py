"""Detection on image files: what `rtdetr-jax detect` runs.

    records = detect_files(["photos/", "cat.jpg"], DetectOptions(model="PekingU/rtdetr_v2_r18vd", out_dir="out"))

For every readable image: an annotated copy in `out_dir` (boxes, label names, scores; `visualize.py`) and one line
of `out_dir/detections.jsonl`:

    {"image": "photos/a.jpg", "width": 640, "height": 480, "annotated": "out/a.jpg",
     "detections": [{"label": "cat", "label_id": 15, "score": 0.93, "box_xyxy": [x0, y0, x1, y1]}, ...]}

Boxes are in pixels of the image as displayed (EXIF orientation applied). Images go through the model in batches of
one fixed shape (the last batch padded), so the forward compiles once; the next batch is decoded on a worker thread
while the current one runs. Files named on the command line must be readable (else a one-line error before any
work); unreadable files met while walking a folder are skipped with a warning. Every output file is written under
a temporary name and renamed when complete.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from rtdetr_jax.io_utils import atomic_path
from rtdetr_jax.processing import ImageLoadError, RTDetrImageProcessor, load_image, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_MODEL = "PekingU/rtdetr_v2_r18vd"
JSONL_NAME = "detections.jsonl"


class DetectError(ValueError):
    """Bad input to detection: no such file, no images, unreadable image, bad option value."""


@dataclasses.dataclass
class DetectOptions:
    model: str = DEFAULT_MODEL
    out_dir: str = "detections"
    threshold: float = 0.5
    batch_size: int = 4
    dtype: str = "float32"
    device: str | None = None  # "cpu", "gpu", "tpu"; None: JAX's default
    revision: str | None = None
    progress: bool | None = None  # None: a bar when there are more than a few images
    draw: bool = True


@dataclasses.dataclass
class ImageItem:
    path: str  # as found (given, or joined under a given folder)
    output_name: str  # annotated copy's file name inside out_dir (may include sub-folders)
    explicit: bool  # named on the command line (an error if unreadable) rather than found in a folder


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _annotated_name(relative: str) -> str:
    stem, ext = os.path.splitext(relative)
    return stem + (ext if ext.lower() in (".jpg", ".jpeg", ".png") else ".png")


def collect_images(inputs: Sequence[str]) -> list[ImageItem]:
    """Files as given, folders walked (sorted, hidden entries skipped) for image extensions."""
    if not inputs:
        raise DetectError("no images given")
    items: list[ImageItem] = []
    for given in inputs:
        if os.path.isdir(given):
            found = []
            for root, dirs, files in os.walk(given):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files) if _is_image_name(f)]
            if not found:
                raise DetectError(f"{given}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            base = os.path.basename(os.path.normpath(given))
            items += [ImageItem(p, _annotated_name(os.path.join(base, os.path.relpath(p, given))), False)
                      for p in found]
        elif os.path.exists(given):
            items.append(ImageItem(given, _annotated_name(os.path.basename(given)), True))
        else:
            raise DetectError(f"{given}: no such file or folder")
    used: set[str] = set()
    for item in items:  # two inputs with the same name must not overwrite each other's picture
        name, n = item.output_name, 1
        while name in used:
            stem, ext = os.path.splitext(item.output_name)
            name, n = f"{stem}-{n}{ext}", n + 1
        used.add(name)
        item.output_name = name
    return items


def open_rgb(path: str) -> Image.Image:
    """Decode fully, apply the EXIF orientation, convert any mode (grey, palette, RGBA, 16-bit) to RGB."""
    image = load_image(path)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # a malformed EXIF block: keep the stored orientation
        print(f"rtdetr-jax detect: warning: {path}: EXIF orientation ignored ({type(err).__name__})",
              file=sys.stderr)
    return to_rgb(image)


def _select_device(name: str | None):
    import jax

    if name is None:
        return None
    try:
        devices = jax.devices(name)
    except RuntimeError:
        devices = []
    if not devices:
        have = sorted({d.platform for d in jax.devices()})
        raise DetectError(f"--device {name}: no such device here (available: {', '.join(have)})")
    return devices[0]


class Detector:
    """A model plus its image processor; `detect` runs PIL images through one compiled batch shape."""

    def __init__(self, model, processor: RTDetrImageProcessor, batch_size: int, threshold: float):
        if not 0.0 <= threshold <= 1.0:
            raise DetectError(f"threshold {threshold} must be within [0, 1]")
        if batch_size < 1:
            raise DetectError(f"batch size {batch_size} must be >= 1")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.threshold = threshold

    def detect(self, images: Sequence[Image.Image], pixel_values: np.ndarray | None = None) -> list[list[dict]]:
        """Detections per image (`{"label", "label_id", "score", "box_xyxy"}`, best first)."""
        if pixel_values is None:
            pixel_values = self.processor(images)["pixel_values"]
        n = len(images)
        if n < self.batch_size:  # pad to the compiled shape
            pad = np.zeros((self.batch_size - n,) + pixel_values.shape[1:], pixel_values.dtype)
            pixel_values = np.concatenate([pixel_values, pad])
        from rtdetr_jax.model import DETECTION_FIELDS  # imported with the model: jax is loaded by now

        outputs = self.model(pixel_values=pixel_values, output_fields=DETECTION_FIELDS)
        outputs = {"logits": np.asarray(outputs.logits, np.float32)[:n],
                   "pred_boxes": np.asarray(outputs.pred_boxes, np.float32)[:n]}
        results = self.processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(im.height, im.width) for im in images])
        id2label = self.model.config.id2label
        per_image = []
        for im, res in zip(images, results):
            dets = []
            for score, label, box in zip(res["scores"], res["labels"], res["boxes"]):
                x0, y0, x1, y1 = (float(np.clip(v, 0, hi)) for v, hi in
                                  zip(box, (im.width, im.height, im.width, im.height)))
                dets.append({"label": id2label.get(int(label), str(int(label))), "label_id": int(label),
                             "score": round(float(score), 4), "box_xyxy": [round(v, 2) for v in (x0, y0, x1, y1)]})
            per_image.append(dets)
        return per_image


def _batches(items: list[ImageItem], size: int, processor: RTDetrImageProcessor,
             warn: Callable[[str], None]) -> Iterator[tuple[list[ImageItem], list[Image.Image], np.ndarray]]:
    """Decoded batches of readable images; the next batch is decoded on worker threads meanwhile."""

    def load(item: ImageItem):
        try:
            image = open_rgb(item.path)
        except ImageLoadError as err:
            return item, None, str(err)
        return item, image, processor.preprocess_one(image)

    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(load, it) for it in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            current = [f.result() for f in pending]
            pending = [pool.submit(load, it) for it in chunks[k + 1]] if k + 1 < len(chunks) else []
            good = []
            for item, image, arr in current:
                if image is None:
                    if item.explicit:
                        raise DetectError(arr)
                    warn(f"{arr} (skipped)")
                else:
                    good.append((item, image, arr))
            if good:
                yield [g[0] for g in good], [g[1] for g in good], np.stack([g[2] for g in good])


def _save_image(image: Image.Image, path: str) -> None:
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def load_detector(options: DetectOptions):
    from rtdetr_jax.hub import resolve_file
    from rtdetr_jax.model import RTDetrV2ForObjectDetection
    from rtdetr_jax.processing import PREPROCESSOR_CONFIG

    model = RTDetrV2ForObjectDetection.from_pretrained(options.model, revision=options.revision,
                                                       dtype=options.dtype)
    has_processor = resolve_file(options.model, PREPROCESSOR_CONFIG, revision=options.revision, required=False)
    processor = (RTDetrImageProcessor.from_pretrained(options.model, revision=options.revision)
                 if has_processor else RTDetrImageProcessor())
    return model, processor


def detect_files(inputs: Sequence[str], options: DetectOptions, warn: Callable[[str], None] | None = None,
                 detector: Detector | None = None) -> list[dict]:
    """Run detection on files and folders; write annotated copies and `detections.jsonl`; return the records."""
    warn = warn or (lambda msg: print(f"rtdetr-jax detect: warning: {msg}", file=sys.stderr))
    if not 0.0 <= options.threshold <= 1.0:
        raise DetectError(f"--threshold {options.threshold} must be within [0, 1]")
    items = collect_images(inputs)
    for item in items:  # named files: fail now, before loading a model or writing anything
        if item.explicit:
            load_image(item.path)
    device = _select_device(options.device)
    import jax

    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        if detector is None:
            model, processor = load_detector(options)
            detector = Detector(model, processor, min(options.batch_size, len(items)), options.threshold)
        show_bar = options.progress if options.progress is not None else len(items) > 4
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="detect", unit="img", dynamic_ncols=True, file=sys.stderr)
        created = not os.path.exists(options.out_dir)
        os.makedirs(options.out_dir, exist_ok=True)
        records: list[dict] = []
        try:
            with atomic_path(os.path.join(options.out_dir, JSONL_NAME)) as tmp_jsonl:
                with open(tmp_jsonl, "w", encoding="utf-8") as fh:
                    for batch_items, images, pixels in _batches(items, detector.batch_size, detector.processor,
                                                                warn):
                        for item, image, dets in zip(batch_items, images, detector.detect(images, pixels)):
                            record = {"image": item.path, "width": image.width, "height": image.height,
                                      "detections": dets}
                            if options.draw:
                                from rtdetr_jax.visualize import draw_detections

                                out_path = os.path.join(options.out_dir, item.output_name)
                                _save_image(draw_detections(image, dets), out_path)
                                record["annotated"] = out_path
                            fh.write(json.dumps(record) + "\n")
                            records.append(record)
                        if bar is not None:
                            bar.update(len(batch_items))
                    if not records:
                        raise DetectError(f"{', '.join(inputs)}: none of the {len(items)} image files could be read")
        except BaseException:
            if created:  # leave no empty output folder behind (complete pictures written so far stay)
                with contextlib.suppress(OSError):
                    os.rmdir(options.out_dir)
            raise
        finally:
            if bar is not None:
                bar.close()
    return records


def summary_table(records: list[dict], limit: int = 20) -> str:
    """A short text table: image, size, number of detections, the best three."""
    rows = [("image", "size", "boxes", "best")]
    for r in records[:limit]:
        best = ", ".join(f"{d['label']} {d['score']:.2f}" for d in r["detections"][:3])
        rows.append((r["image"], f"{r['width']}x{r['height']}", str(len(r["detections"])), best or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] for row in rows]
    if len(records) > limit:
        lines.append(f"... and {len(records) - limit} more")
    return "\n".join(lines)
