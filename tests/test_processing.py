"""Image processor: pixel_values equal to transformers' (PIL backend), same post-processing, image modes, EXIF."""

import numpy as np
import pytest
import torch
from images import synthetic_image
from PIL import Image

from rtdetr_jax import ImageLoadError, RTDetrImageProcessor


@pytest.fixture(scope="module")
def theirs():
    from transformers import RTDetrImageProcessor as TorchProcessor

    return TorchProcessor()


@pytest.mark.parametrize("size", [(480, 640), (333, 517), (640, 640), (50, 1200)])
def test_pixel_values_match_transformers(theirs, size):
    images = [synthetic_image(*size, seed=1), synthetic_image(*size, seed=2)]
    ours = RTDetrImageProcessor()(images=images, return_tensors="np")["pixel_values"]
    expected = theirs(images=images, return_tensors="np")["pixel_values"]
    assert ours.shape == expected.shape == (2, 3, 640, 640) and ours.dtype == np.float32
    assert np.abs(ours - np.asarray(expected)).max() <= 1e-6


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_modes_convert_like_transformers(theirs, mode):
    image = synthetic_image(120, 90, seed=4).convert(mode)
    ours = RTDetrImageProcessor()(images=image)["pixel_values"]
    expected = theirs(images=image, do_convert_rgb=True, return_tensors="np")["pixel_values"]
    assert np.abs(ours - np.asarray(expected)).max() <= 1e-6


def test_sixteen_bit_and_exif(tmp_path):
    arr16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    img16 = Image.fromarray(arr16)
    assert img16.mode.startswith("I")
    out = RTDetrImageProcessor()(images=img16)["pixel_values"]
    assert out.shape == (1, 3, 640, 640) and 0.9 < out.max() <= 1.0 and out.min() < 0.05

    base = synthetic_image(40, 80, seed=6)  # 80 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    base.save(path, exif=exif)
    p = RTDetrImageProcessor(size={"height": 80, "width": 40})
    rotated = p(images=str(path))["pixel_values"][0]
    upright = p(images=base.rotate(-90, expand=True))["pixel_values"][0]
    assert np.abs(rotated - upright).mean() < 0.05


def test_bad_images(tmp_path):
    p = RTDetrImageProcessor()
    with pytest.raises(ImageLoadError, match="nope.jpg: no such file"):
        p(images=str(tmp_path / "nope.jpg"))
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageLoadError, match="text.jpg: not a readable image file"):
        p(images=str(tmp_path / "text.jpg"))
    synthetic_image(64, 64).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="cut.png: corrupt or truncated"):
        p(images=str(tmp_path / "cut.png"))
    tiny = p(images=Image.new("RGB", (1, 1), (10, 20, 30)))["pixel_values"]
    assert tiny.shape == (1, 3, 640, 640)
    with pytest.raises(ValueError, match="expected uint8 or float"):
        p(images=np.zeros((4, 4, 3), np.int64))


def test_post_process_matches_transformers(theirs):
    rng = np.random.default_rng(0)
    logits = rng.normal(-2, 2, size=(2, 30, 7)).astype(np.float32)
    boxes = rng.uniform(0.1, 0.6, size=(2, 30, 4)).astype(np.float32)
    sizes = [(480, 640), (300, 200)]

    class Out:
        pass

    out = Out()
    out.logits, out.pred_boxes = torch.from_numpy(logits), torch.from_numpy(boxes)
    expected = theirs.post_process_object_detection(out, threshold=0.3, target_sizes=sizes)
    ours = RTDetrImageProcessor().post_process_object_detection(
        {"logits": logits, "pred_boxes": boxes}, threshold=0.3, target_sizes=sizes)
    for a, b in zip(ours, expected):
        assert len(a["scores"]) == len(b["scores"]) > 0
        np.testing.assert_allclose(a["scores"], b["scores"].numpy(), atol=1e-6)
        np.testing.assert_array_equal(a["labels"], b["labels"].numpy())
        np.testing.assert_allclose(a["boxes"], b["boxes"].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="threshold=1.5"):
        RTDetrImageProcessor().post_process_object_detection({"logits": logits, "pred_boxes": boxes}, 1.5)
    with pytest.raises(ValueError, match="target_sizes has shape"):
        RTDetrImageProcessor().post_process_object_detection({"logits": logits, "pred_boxes": boxes},
                                                             target_sizes=[(1, 2)])


def test_top_above_equals_the_stable_sort():
    """`top_above` is the first k of a stable descending argsort with the scores <= threshold dropped, ties and
    NaN included; checked on scores with many ties (a handful of distinct values) and on continuous ones."""
    from rtdetr_jax.processing import top_above

    rng = np.random.default_rng(0)
    cases = 0
    for trial in range(300):
        n = int(rng.integers(1, 60))
        if trial % 3 == 0:
            scores = rng.integers(0, 5, n).astype(np.float32) / 4  # heavy ties, some at the threshold
        else:
            scores = rng.uniform(0, 1, n).astype(np.float32)
        if trial % 7 == 0:
            scores[rng.integers(0, n, 3)] = np.nan
        k = int(rng.integers(1, n + 3))
        threshold = float(rng.choice([0.0, 0.25, 0.5, 0.9, 1.0]))
        order = np.argsort(-scores, kind="stable")[:k]
        expected = order[scores[order] > threshold]
        got = top_above(scores, k, threshold)
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}: k={k} threshold={threshold}")
        cases += got.size > 0 and np.flatnonzero(scores > threshold).size > k
    assert cases > 50  # the partition branch ran often


def test_post_process_top_k_and_softmax_paths():
    """top_k limits the detections (highest first); the softmax path drops the last (no-object) class."""
    logits = np.full((1, 4, 3), -10.0, np.float32)
    logits[0, 0, 1], logits[0, 2, 0], logits[0, 3, 2] = 3.0, 2.0, 1.0
    boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (1, 4, 1))
    p = RTDetrImageProcessor()
    res = p.post_process_object_detection({"logits": logits, "pred_boxes": boxes}, threshold=0.5, top_k=2)[0]
    np.testing.assert_array_equal(res["labels"], [1, 0])
    assert res["scores"][0] > res["scores"][1] > 0.5 and res["boxes"].shape == (2, 4)
    soft = p.post_process_object_detection({"logits": logits, "pred_boxes": boxes}, threshold=0.5,
                                           use_focal_loss=False)[0]
    np.testing.assert_array_equal(soft["labels"], [1, 0])  # query 3's best is the no-object class: dropped


def test_processor_config_round_trip(tmp_path):
    from transformers import RTDetrImageProcessor as TorchProcessor

    TorchProcessor(size={"height": 512, "width": 512}).save_pretrained(tmp_path / "t")
    ours = RTDetrImageProcessor.from_pretrained(tmp_path / "t")
    assert ours.size == {"height": 512, "width": 512} and ours.do_rescale and not ours.do_normalize
    ours.save_pretrained(tmp_path / "o")
    assert TorchProcessor.from_pretrained(tmp_path / "o").size["height"] == 512
