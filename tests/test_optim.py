"""The optimizer of the authors' recipe: parameter groups, the group-packed AdamW against the same AdamW written
leaf by leaf with optax, EMA warm-up, bad settings, and a checkpoint whose state layout does not fit."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import small_config
from rtdetr_jax.train.optim import (GroupPacking, OptimConfig, ema_decay, learning_rate_schedule, make_optimizer,
                                    parameter_group)


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


def params_of_every_group(seed=0):
    """A small tree with a leaf in every parameter group (`backbone_no_decay` when norms are not frozen)."""
    rng = np.random.default_rng(seed)
    leaf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return {"model": {
        "backbone": {"model": {"embedder": {"embedder_0": {
            "normalization": {"weight": leaf(8), "bias": leaf(8)},  # frozen / backbone_no_decay
            "convolution": {"kernel": leaf(3, 3, 3, 8)}}}}},  # backbone
        "encoder": {"fpn_blocks_0": {"conv1": {"norm": {"weight": leaf(8), "bias": leaf(8)}}}},  # no_decay
        "decoder": {"layers_0": {"fc1": {"kernel": leaf(8, 16), "bias": leaf(16)}}},  # default, no_decay
        "denoising_class_embed": {"embedding": leaf(5, 8)},  # no_decay
    }}


@pytest.mark.parametrize("freeze", [True, False])
def test_packed_optimizer_equals_the_per_leaf_optax_chain(freeze):
    """`make_optimizer` runs on one vector per group; the same AdamW written leaf by leaf with optax (masked
    zeroing of frozen leaves, global-norm clip, Adam, masked decay, schedule, per-leaf multiplier) must give the
    same updates, step after step, with the clip active."""
    params = params_of_every_group()
    cfg = OptimConfig(learning_rate=1e-2, backbone_lr_multiplier=0.1, weight_decay=0.5, warmup_steps=2,
                      clip_norm=0.1, freeze_backbone_batch_norms=freeze)
    flat_groups = {k: parameter_group(k, freeze) for k in traverse_util.flatten_dict(params)}
    per_leaf = lambda f: traverse_util.unflatten_dict({k: f(g) for k, g in flat_groups.items()})  # noqa: E731
    reference = optax.chain(
        optax.masked(optax.set_to_zero(), per_leaf(lambda g: g == "frozen")),
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay, mask=per_leaf(lambda g: g in ("backbone", "default"))),
        optax.scale_by_learning_rate(learning_rate_schedule(cfg)),
    )
    multiplier = per_leaf(lambda g: 0.0 if g == "frozen" else 0.1 if g.startswith("backbone") else 1.0)
    assert (set(flat_groups.values()) == {"frozen", "backbone", "no_decay", "default"} if freeze
            else set(flat_groups.values()) == {"backbone", "backbone_no_decay", "no_decay", "default"})

    tx = make_optimizer(cfg, params)
    ours_state, ref_state = tx.init(params), reference.init(params)
    ours_params = ref_params = params
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        assert float(optax.tree.norm(grads)) > 10 * cfg.clip_norm  # the clip acts
        ours, ours_state = tx.update(grads, ours_state, ours_params)
        ref, ref_state = reference.update(grads, ref_state, ref_params)
        ref = jax.tree_util.tree_map(lambda u, m: u * m, ref, multiplier)
        flat_ours, flat_ref = traverse_util.flatten_dict(ours), traverse_util.flatten_dict(ref)
        assert flat_ours.keys() == flat_ref.keys()
        for path in flat_ref:
            assert flat_ours[path].shape == flat_ref[path].shape and flat_ours[path].dtype == jnp.float32
            np.testing.assert_allclose(flat_ours[path], flat_ref[path], rtol=2e-5, atol=1e-9, err_msg=str(path))
        ours_params, ref_params = optax.apply_updates(ours_params, ours), optax.apply_updates(ref_params, ref)
    # its state: one Adam moment vector per group that trains, nothing for frozen leaves
    trained = sum(int(np.prod(np.shape(leaf))) for path, leaf in traverse_util.flatten_dict(params).items()
                  if flat_groups[path] != "frozen")
    moments = [leaf for leaf in jax.tree_util.tree_leaves(ours_state) if np.ndim(leaf) == 1]
    assert sum(m.size for m in moments) == 2 * trained


def test_group_packing_round_trip_and_errors():
    params = params_of_every_group()
    packing = GroupPacking(params)
    packed = packing.pack(params)
    assert set(packed) == {"backbone", "no_decay", "default"}
    assert all(v.ndim == 1 for v in packed.values())
    back = traverse_util.flatten_dict(packing.unpack(packed))
    for path, leaf in traverse_util.flatten_dict(params).items():
        expected = np.zeros_like(leaf) if parameter_group(path) == "frozen" else leaf
        np.testing.assert_array_equal(back[path], expected, err_msg=str(path))
    partial = traverse_util.flatten_dict(params)
    del partial[("model", "decoder", "layers_0", "fc1", "kernel")]
    with pytest.raises(ValueError, match=r"^parameter model/decoder/layers_0/fc1/kernel is missing .*1 missing"):
        packing.pack(traverse_util.unflatten_dict(partial))


def test_checkpoint_of_another_state_layout_is_a_one_line_error(tmp_path):
    from rtdetr_jax.train.checkpoint import Checkpointer
    from rtdetr_jax.train.state import create_train_state

    variables = {"params": params_of_every_group(), "batch_stats": {}}
    ckpt = Checkpointer(tmp_path, asynchronous=False)
    # the optimizer state as rtdetr-jax saved it before the packing: optax transforms over the parameter tree
    ckpt.save(3, create_train_state(variables, optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-3))),
              {"epoch": 0})
    ours = create_train_state(variables, make_optimizer(OptimConfig(), variables["params"]))
    with pytest.raises(ValueError) as err:
        ckpt.restore(ours)
    ckpt.close()
    message = str(err.value)
    assert "\n" not in message and message.startswith(os.path.join(str(tmp_path), "last", "3") + ":")
    assert "does not fit this run's" in message and "opt_state" in message


def test_ema_decay_warms_up_like_the_authors():
    cfg = OptimConfig(ema_decay=0.9999, ema_warmup_steps=2000)
    for n in (1, 100, 2000, 20000):
        assert float(ema_decay(cfg, jnp.asarray(n))) == pytest.approx(0.9999 * (1 - np.exp(-n / 2000)), rel=1e-5)


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match="schedule='cosine' needs total_steps"):
        OptimConfig(schedule="cosine")
    with pytest.raises(ValueError, match="ema_decay=1.5"):
        OptimConfig(ema_decay=1.5)
