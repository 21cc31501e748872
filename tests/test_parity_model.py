"""Whole-model parity with transformers' PyTorch RTDetrV2ForObjectDetection, loaded through our from_pretrained.

See `conftest.assert_parity` for what is compared (float64 implementation parity <= 1e-4 on every output, and
float32 accuracy no worse than PyTorch's).
"""

import pytest
from conftest import TINY_BASIC, TINY_BOTTLENECK, assert_parity, build_reference, r18vd_config, tiny_config
from images import synthetic_batch

from rtdetr_jax import RTDetrV2ForObjectDetection


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("layout", [TINY_BASIC, TINY_BOTTLENECK], ids=["basic", "bottleneck"])
def test_reduced_width_parity(tmp_path, images_2x96x128, layout, method):
    """Batch 2, non-square 96x128 input, both backbones, both samplers."""
    reference = build_reference(tmp_path, tiny_config(layout, decoder_method=method), seed=1)
    model = RTDetrV2ForObjectDetection.from_pretrained(tmp_path)
    assert_parity(reference, model, images_2x96x128)


def test_r18vd_full_size_parity(tmp_path):
    """The published r18vd layout (80 classes, 300 queries) on one 640x640 image."""
    reference = build_reference(tmp_path, r18vd_config(), seed=7)
    model = RTDetrV2ForObjectDetection.from_pretrained(tmp_path)
    out = model(pixel_values=synthetic_batch(1, 640, 640, seed=11))
    assert out.logits.shape == (1, 300, 80) and out.pred_boxes.shape == (1, 300, 4)
    assert_parity(reference, model, synthetic_batch(1, 640, 640, seed=11))
