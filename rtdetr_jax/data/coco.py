"""COCO-format detection datasets: an instances json plus a folder of images.

Categories are mapped to contiguous class indices in order of category id (`id2label` keeps the names and
`label_to_category_id` maps back for evaluation). Problems in the annotations never reach the loss as NaNs:
- crowd annotations, boxes of zero or negative width/height (after clipping to the image) and boxes wholly outside
  the image are skipped, and counted in `skipped` (reported once as a warning);
- annotations whose category id is not in `categories`, or whose image id is unknown, are skipped and counted;
- a malformed file (not JSON, missing `images`/`annotations`/`categories`, a bbox that is not 4 numbers) is a
  `DatasetError` naming the file and the entry.
Corrupt images are found when loaded (`ImageLoadError` with the file name); the loader skips them with a warning.
"""

from __future__ import annotations

import collections
import json
import os
import warnings

import numpy as np

from rtdetr_jax.processing import load_image, to_rgb


class DatasetError(ValueError):
    """The annotation file or image folder cannot be used."""


class CocoDetection:
    """Images and boxes of one COCO split.

    `sample(i)` returns (RGB PIL image, boxes (n, 4) float32 absolute x0 y0 x1 y1, labels (n,) int32, image id).
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, *, warn: bool = True):
        self.annotation_file = os.fspath(annotation_file)
        self.image_dir = os.fspath(image_dir)
        if not os.path.isfile(self.annotation_file):
            raise DatasetError(f"{self.annotation_file}: annotation file not found")
        if not os.path.isdir(self.image_dir):
            raise DatasetError(f"{self.image_dir}: image folder not found")
        try:
            with open(self.annotation_file, encoding="utf-8") as fh:
                coco = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{self.annotation_file}: not valid JSON ({err})") from None
        if not isinstance(coco, dict):
            raise DatasetError(f"{self.annotation_file}: expected a JSON object with images/annotations/categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(coco.get(key), list):
                raise DatasetError(f"{self.annotation_file}: missing or non-list '{key}'")
        if not coco["categories"]:
            raise DatasetError(f"{self.annotation_file}: 'categories' is empty")
        if not coco["images"]:
            raise DatasetError(f"{self.annotation_file}: 'images' is empty")

        try:
            categories = sorted(coco["categories"], key=lambda c: int(c["id"]))
            self.label_to_category_id = [int(c["id"]) for c in categories]
            self.id2label = {i: str(c.get("name", c["id"])) for i, c in enumerate(categories)}
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{self.annotation_file}: every category needs an integer 'id'") from None
        category_to_label = {cid: i for i, cid in enumerate(self.label_to_category_id)}

        self.images = []
        index = {}
        for entry in coco["images"]:
            try:
                image = {"id": int(entry["id"]), "file_name": str(entry["file_name"]),
                         "width": int(entry["width"]), "height": int(entry["height"])}
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{self.annotation_file}: image entry {entry!r:.120} needs id, file_name, "
                                   "width and height") from None
            index[image["id"]] = len(self.images)
            self.images.append(image)

        self.skipped = collections.Counter()
        boxes = [[] for _ in self.images]
        labels = [[] for _ in self.images]
        for ann in coco["annotations"]:
            try:
                image_id = int(ann["image_id"])
                category = int(ann["category_id"])
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{self.annotation_file}: annotation {ann.get('id', '?')} needs image_id, "
                                   "category_id and a bbox of 4 numbers") from None
            if image_id not in index:
                self.skipped["unknown image id"] += 1
                continue
            if category not in category_to_label:
                self.skipped["unknown category id"] += 1
                continue
            if ann.get("iscrowd", 0):
                self.skipped["crowd"] += 1
                continue
            if not all(np.isfinite([x, y, w, h])):
                self.skipped["non-finite box"] += 1
                continue
            img = self.images[index[image_id]]
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, img["width"]), min(y + h, img["height"])
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                self.skipped["empty or outside the image"] += 1
                continue
            boxes[index[image_id]].append((x0, y0, x1, y1))
            labels[index[image_id]].append(category_to_label[category])
        self.boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
        self.labels = [np.asarray(lb, np.int32) for lb in labels]
        if warn and self.skipped:
            detail = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            warnings.warn(f"{self.annotation_file}: skipped annotations: {detail}", stacklevel=2)

    @property
    def num_classes(self) -> int:
        return len(self.id2label)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, i: int) -> str:
        return os.path.join(self.image_dir, self.images[i]["file_name"])

    def sample(self, i: int):
        image = to_rgb(load_image(self.image_path(i)))
        return image, self.boxes[i].copy(), self.labels[i].copy(), self.images[i]["id"]


def load_split(data_dir: str | os.PathLike, split: str) -> CocoDetection:
    """`DIR/annotations/instances_{split}.json` with images in `DIR/{split}` (or `DIR/images/{split}`)."""
    data_dir = os.fspath(data_dir)
    ann = os.path.join(data_dir, "annotations", f"instances_{split}.json")
    for images in (os.path.join(data_dir, split), os.path.join(data_dir, "images", split),
                   os.path.join(data_dir, f"{split}2017")):
        if os.path.isdir(images):
            return CocoDetection(ann, images)
    if not os.path.isfile(ann):
        raise DatasetError(f"{ann}: annotation file not found")
    raise DatasetError(f"{data_dir}: no image folder for split '{split}' ({split}/ or images/{split}/)")
