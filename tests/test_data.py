"""COCO dataset reading (errors and documented skips), augmentations, deterministic batches, COCO mAP."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from rtdetr_jax.data import transforms as T
from rtdetr_jax.data.coco import CocoDetection, DatasetError, load_split
from rtdetr_jax.data.loader import DetectionLoader, LoaderConfig
from rtdetr_jax.data.synthetic import CLASSES, write_shapes_dataset
from rtdetr_jax.train.evaluate import coco_map, detections_from_outputs


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(folder), train=12, val=4, size=96, seed=0)
    return str(folder)


def write_coco(folder, images, annotations, categories=None):
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(os.path.join(folder, "img", im["file_name"]))
    path = os.path.join(folder, "ann.json")
    with open(path, "w") as fh:
        json.dump({"images": images, "annotations": annotations,
                   "categories": categories or [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}, fh)
    return path, os.path.join(folder, "img")


def test_synthetic_dataset_is_valid_coco(shapes):
    ds = load_split(shapes, "train")
    assert len(ds) == 12 and ds.id2label == dict(enumerate(CLASSES)) and not ds.skipped
    image, boxes, labels, _ = ds.sample(0)
    assert image.size == (96, 96) and len(boxes) == len(labels) >= 1
    assert np.all(boxes[:, 2:] > boxes[:, :2]) and np.all(boxes >= 0) and np.all(boxes <= 96)


def test_bad_annotations_are_skipped_and_counted(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 10]},  # fine -> label 1
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [45, 30, 20, 20]},  # clipped to the image
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},  # zero width
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [60, 5, 5, 5]},  # outside
        {"id": 5, "image_id": 1, "category_id": 99, "bbox": [5, 5, 5, 5]},  # unknown category
        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5], "iscrowd": 1},
        {"id": 7, "image_id": 42, "category_id": 3, "bbox": [5, 5, 5, 5]},  # unknown image
    ]
    ann, img = write_coco(str(tmp_path), images, anns)
    with pytest.warns(UserWarning, match="skipped annotations"):
        ds = CocoDetection(ann, img)
    assert ds.label_to_category_id == [3, 7]
    assert ds.labels[0].tolist() == [1, 0]
    np.testing.assert_allclose(ds.boxes[0], [[5, 5, 15, 15], [45, 30, 50, 40]])
    assert ds.skipped == {"empty or outside the image": 2, "unknown category id": 1, "crowd": 1,
                          "unknown image id": 1}


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', "'images' is empty"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]}', "needs id, file_name"),
    ('{"annotations": [], "categories": []}', "missing or non-list 'images'"),
    ('{"images": [{"id": 1, "file_name": "a", "width": 1, "height": 1}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2]}]}', "annotation 5 needs"),
])
def test_malformed_annotation_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        CocoDetection(path, tmp_path)
    assert str(path) in str(err.value)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDetection(tmp_path / "nope.json", tmp_path)
    with pytest.raises(DatasetError, match="annotation file not found"):
        load_split(str(tmp_path), "train")


def test_augmentations_keep_boxes_valid():
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (120, 80), (10, 200, 30))
    boxes = np.asarray([[10, 10, 50, 40], [60, 20, 118, 79], [0, 0, 5, 5]], np.float32)
    labels = np.asarray([0, 1, 2], np.int32)
    for _ in range(60):
        pixels, cxcywh, lab = T.train_transform(image, boxes, labels, 64, rng)
        assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0
        assert len(cxcywh) == len(lab)
        xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
        assert np.all(cxcywh[:, 2:] * 64 >= 1 - 1e-4)  # sanitized: at least one pixel
        assert np.all(xyxy >= -1e-5) and np.all(xyxy <= 1 + 1e-5)


def test_horizontal_flip_mirrors_boxes():
    image = Image.new("RGB", (100, 50))

    class Always:
        def random(self):
            return 0.0

    out, flipped = T.horizontal_flip(image, np.asarray([[10, 5, 30, 20]], np.float32), Always())
    np.testing.assert_allclose(flipped, [[70, 5, 90, 20]])


def test_batches_are_deterministic_and_resumable(shapes):
    ds = load_split(shapes, "train")
    cfg = LoaderConfig(batch_size=4, image_size=64, max_boxes=6, seed=3, workers=2)
    a = list(DetectionLoader(ds, cfg).epoch(1))
    b = list(DetectionLoader(ds, cfg).epoch(1))
    resumed = list(DetectionLoader(ds, cfg).epoch(1, start=2))
    assert len(a) == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.pixel_values, y.pixel_values)
        np.testing.assert_array_equal(x.targets.boxes, y.targets.boxes)
    np.testing.assert_array_equal(a[2].pixel_values, resumed[0].pixel_values)
    other_epoch = list(DetectionLoader(ds, cfg).epoch(2))
    assert not np.array_equal(a[0].image_ids, other_epoch[0].image_ids) or not np.array_equal(
        a[0].pixel_values, other_epoch[0].pixel_values)
    # padding: masked rows hold a safe box, real rows valid boxes
    t = a[0].targets
    assert t.labels.shape == (4, 6) and np.all(t.boxes[~t.mask] == 0.5)


def test_multi_scale_and_stop_epoch(shapes):
    ds = load_split(shapes, "train")
    cfg = LoaderConfig(batch_size=2, image_size=64, max_boxes=6, multi_scale_sizes=(32, 64, 96),
                       stop_strong_aug_epoch=2, workers=0)
    loader = DetectionLoader(ds, cfg)
    sizes = {b.pixel_values.shape[-1] for b in loader.epoch(0)}
    assert len(sizes) > 1 and sizes <= {32, 64, 96}
    assert {b.pixel_values.shape[-1] for b in loader.epoch(2)} == {64}


def test_corrupt_image_is_skipped_with_warning(shapes, tmp_path):
    import shutil

    copy = tmp_path / "shapes"
    shutil.copytree(shapes, copy)
    with open(copy / "train" / "000001.jpg", "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 truncated")
    loader = DetectionLoader(load_split(str(copy), "train"),
                             LoaderConfig(batch_size=12, image_size=64, max_boxes=6, workers=0, train=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(loader.epoch(0))
    assert any("000001.jpg" in str(w.message) for w in caught)
    assert loader.skipped["unreadable image"] == 1 and np.all(np.isfinite(batch.pixel_values))


def test_coco_map_of_perfect_and_shifted_detections(shapes):
    ds = load_split(shapes, "val")
    size = np.asarray([[im["height"], im["width"]] for im in ds.images])
    ids = np.asarray([im["id"] for im in ds.images])
    q, c = 10, ds.num_classes
    logits = np.full((len(ds), q, c), -10.0, np.float32)
    boxes = np.full((len(ds), q, 4), 0.5, np.float32)
    for i in range(len(ds)):
        for j, (b, lab) in enumerate(zip(ds.boxes[i], ds.labels[i])):
            h, w = size[i]
            boxes[i, j] = [(b[0] + b[2]) / 2 / w, (b[1] + b[3]) / 2 / h, (b[2] - b[0]) / w, (b[3] - b[1]) / h]
            logits[i, j, lab] = 10.0
    perfect = coco_map(ds, detections_from_outputs(logits, boxes, ids, size, ds.label_to_category_id))
    assert perfect["AP"] > 0.99 and perfect["AP50"] > 0.99
    shifted = boxes.copy()
    shifted[..., 0] += 0.5 * shifted[..., 2]  # IoU 1/3 with the truth
    worse = coco_map(ds, detections_from_outputs(logits, shifted, ids, size, ds.label_to_category_id))
    assert worse["AP50"] < 0.05
    assert coco_map(ds, []) == {k: 0.0 for k in perfect}
