"""The optimizer of the authors' recipe: parameter groups, EMA warm-up, bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import small_config
from rtdetr_jax.train.optim import OptimConfig, ema_decay, make_optimizer, parameter_group


def test_parameter_groups():
    assert parameter_group(("model", "backbone", "model", "embedder", "embedder_0", "normalization", "weight")) \
        == "frozen"
    assert parameter_group(("model", "backbone", "model", "embedder", "embedder_0", "convolution", "kernel")) \
        == "backbone"
    assert parameter_group(("model", "decoder", "layers_0", "fc1", "bias")) == "no_decay"
    assert parameter_group(("model", "decoder", "layers_0", "final_layer_norm", "scale")) == "no_decay"
    assert parameter_group(("model", "encoder", "fpn_blocks_0", "conv1", "norm", "weight")) == "no_decay"
    assert parameter_group(("model", "denoising_class_embed", "embedding")) == "no_decay"
    assert parameter_group(("model", "decoder", "layers_0", "fc1", "kernel")) == "default"
    # freeze_backbone_batch_norms=False (the `tiny` preset, trained from scratch): backbone norms train, no decay
    assert parameter_group(("model", "backbone", "model", "embedder", "embedder_0", "normalization", "weight"),
                           freeze_backbone_batch_norms=False) == "backbone_no_decay"


def test_optimizer_step_respects_groups():
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    model = RTDetrV2ForObjectDetection(small_config())
    params = model.params
    cfg = OptimConfig(learning_rate=1e-2, backbone_lr_multiplier=0.1, weight_decay=0.5, warmup_steps=0,
                      clip_norm=0.0)
    tx = make_optimizer(cfg, params)
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat_u = traverse_util.flatten_dict(updates)
    flat_p = traverse_util.flatten_dict(params)
    for path, u in flat_u.items():
        group = parameter_group(path)
        p = np.asarray(flat_p[path])
        u = np.asarray(u)
        # Adam's first step moves by lr (sign of the gradient), plus lr * wd * p where decayed
        if group == "frozen":
            assert np.all(u == 0), path
        elif group == "backbone":
            np.testing.assert_allclose(u, -1e-3 * (1 + 0.5 * p), rtol=1e-4, atol=1e-9)
        elif group == "backbone_no_decay":
            np.testing.assert_allclose(u, -1e-3, rtol=1e-4)
        elif group == "no_decay":
            np.testing.assert_allclose(u, -1e-2, rtol=1e-4)
        else:
            np.testing.assert_allclose(u, -1e-2 * (1 + 0.5 * p), rtol=1e-4, atol=1e-9)


def test_ema_decay_warms_up_like_the_authors():
    cfg = OptimConfig(ema_decay=0.9999, ema_warmup_steps=2000)
    for n in (1, 100, 2000, 20000):
        assert float(ema_decay(cfg, jnp.asarray(n))) == pytest.approx(0.9999 * (1 - np.exp(-n / 2000)), rel=1e-5)


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match="schedule='cosine' needs total_steps"):
        OptimConfig(schedule="cosine")
    with pytest.raises(ValueError, match="ema_decay=1.5"):
        OptimConfig(ema_decay=1.5)
