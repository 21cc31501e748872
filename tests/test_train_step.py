"""The jit-compiled train step itself: 8-device data parallelism equal to one device, images without boxes, and the
bfloat16 step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from conftest import small_config
from rtdetr_jax.train.optim import OptimConfig, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MULTI_DEVICE = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, {tests!r})
    assert len(jax.devices()) == 8, jax.devices()
    from flax import traverse_util
    from conftest import small_config
    from rtdetr_jax.loss.criterion import pad_targets
    from rtdetr_jax.train.loop import fresh_model
    from rtdetr_jax.train.optim import OptimConfig, make_optimizer
    from rtdetr_jax.train.state import create_train_state
    from rtdetr_jax.train.step import data_mesh, make_steps

    config = small_config()
    model = fresh_model(config, seed=0)
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0)
    tx = make_optimizer(optim, model.params)
    rng = np.random.default_rng(0)
    pixels = rng.random((8, 3, 96, 96))
    labels = [{{"class_labels": rng.integers(0, 4, n),
               "boxes": np.concatenate([rng.uniform(.3, .7, (n, 2)), rng.uniform(.1, .3, (n, 2))], 1)}}
              for n in (1, 3, 0, 2, 5, 1, 2, 4)]
    targets = pad_targets(labels, 6)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        steps = make_steps(config, optim, tx, dtype=jnp.float64, mesh=data_mesh(devices))
        state = steps.replicate(create_train_state(model.variables, tx, seed=0, param_dtype=jnp.float64))
        state, metrics = steps.train_step(state, *steps.shard_batch((pixels, targets)))
        sharding = state.params["model"]["enc_score_head"]["kernel"].sharding
        print(len(devices), "devices; loss", float(metrics["loss"]), "params on", len(sharding.device_set))
        results.append(traverse_util.flatten_dict(jax.device_get(state.params)))
    worst = max(float(np.abs(results[0][k] - results[1][k]).max()) for k in results[0])
    moved = max(float(np.abs(results[0][k] - np.asarray(v)).max())
                for k, v in traverse_util.flatten_dict(model.params).items())
    print("max param difference", worst, "largest update", moved)
    assert moved > 1e-4 and worst <= 1e-5, worst
""")


def test_eight_devices_equal_one_device():
    """One train step on a global batch of 8: sharded over 8 CPU devices vs on one device.

    Run in float64: in float32, Adam's first update g / (|g| + eps) turns reduction-order noise in the
    near-zero gradients of a fresh model into ~1e-4 parameter differences (measured), which says nothing
    about the data-parallel computation itself."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    script = MULTI_DEVICE.format(tests=os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "8 devices" in res.stdout and "params on 8" in res.stdout


def test_images_without_boxes_give_a_finite_loss():
    from rtdetr_jax.model import RTDetrV2ForObjectDetection

    model = RTDetrV2ForObjectDetection(small_config())
    empty = {"class_labels": np.zeros((0,), np.int64), "boxes": np.zeros((0, 4), np.float32)}
    out = model(pixel_values=np.random.default_rng(0).random((2, 3, 96, 96), np.float32), labels=[empty, empty])
    assert np.isfinite(float(out.loss))
    assert all(np.isfinite(float(v)) for v in out.loss_dict.values())
    # no boxes: only the classification terms can be non-zero
    assert float(out.loss_dict["loss_bbox"]) == 0.0 and float(out.loss_dict["loss_giou"]) == 0.0


def test_bfloat16_training_step():
    """`--dtype bfloat16`: the step computes in bfloat16 (convolutions and matmuls), keeps float32 parameters,
    optimizer state and EMA, and its loss is finite and close to the float32 step's on the same batch."""
    from rtdetr_jax.loss.criterion import pad_targets
    from rtdetr_jax.train.loop import fresh_model
    from rtdetr_jax.train.state import create_train_state
    from rtdetr_jax.train.step import make_steps

    config = small_config()
    model = fresh_model(config, seed=0)
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0)
    tx = make_optimizer(optim, model.params)
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 3, 96, 96)).astype(np.float32)
    targets = pad_targets([{"class_labels": np.array([1, 2]), "boxes": np.array([[.3, .4, .2, .2], [.7, .6, .3, .2]])},
                           {"class_labels": np.array([0]), "boxes": np.array([[.5, .5, .4, .4]])}], 4)
    steps = make_steps(config, optim, tx, dtype=jnp.bfloat16)
    state = steps.replicate(create_train_state(model.variables, tx, seed=0))
    batch = steps.shard_batch((pixels, targets))
    hlo = steps.train_step.lower(state, *batch).as_text()
    assert "bf16" in hlo and "convolution" in hlo
    state, metrics = steps.train_step(state, *batch)
    loss = float(metrics["loss"])
    assert np.isfinite(loss)
    floats = [leaf.dtype for tree in (state.params, state.ema, state.opt_state)
              for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype(jnp.float32)}
    # the same first step in float32 (model(labels=...) is eval mode; use the float32 train step's loss)
    steps32 = make_steps(config, optim, tx, dtype=jnp.float32)
    state32 = steps32.replicate(create_train_state(model.variables, tx, seed=0))
    _, metrics32 = steps32.train_step(state32, *steps32.shard_batch((pixels, targets)))
    assert abs(loss - float(metrics32["loss"])) <= 0.05 * abs(float(metrics32["loss"])), (loss, metrics32["loss"])
