"""jit-compiled train and eval steps, data-parallel over every local device through `jax.sharding`.

The batch is sharded along a `data` mesh axis and everything else replicated; XLA inserts the gradient all-reduce.
Batch-norm statistics are means over the global batch (synchronised batch norm), and the loss normalises by the
global number of boxes, so a step on N devices computes what one device would on the same global batch.
Multi-host: call `jax.distributed.initialize()` first (see README); `jax.devices()` then spans every host and
each host feeds its slice of the global batch (`host_local_batch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtdetr_jax.config import RTDetrV2Config
from rtdetr_jax.loss.criterion import Targets, rtdetr_loss
from rtdetr_jax.modeling.denoising import contrastive_denoising_group
from rtdetr_jax.modeling.detector import RTDetrV2Detector
from rtdetr_jax.train.optim import GroupPacking, OptimConfig, ema_decay, learning_rate_schedule
from rtdetr_jax.train.state import TrainState


def data_mesh(devices=None) -> Mesh:
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


@dataclasses.dataclass
class Steps:
    """The compiled `train_step(state, pixel_values, targets) -> (state, metrics)` and
    `eval_step(variables, pixel_values) -> (logits, pred_boxes)`, plus how to place inputs on the mesh."""

    train_step: Callable
    eval_step: Callable
    mesh: Mesh

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def shard_batch(self, tree):
        """Place this host's part of a batch (numpy) on the mesh, split along the batch axis."""
        n = len(self.mesh.local_devices)
        for leaf in jax.tree_util.tree_leaves(tree):
            if np.shape(leaf)[0] % n:
                raise ValueError(f"batch size {np.shape(leaf)[0]} is not divisible by the {n} local devices")
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(a)), tree
        )

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)


def make_steps(config: RTDetrV2Config, optim: OptimConfig, tx: optax.GradientTransformation, *,
               dtype: Any = jnp.float32, mesh: Mesh | None = None) -> Steps:
    """Build the jit-compiled steps for `config` (compiled once per input shape)."""
    mesh = data_mesh() if mesh is None else mesh
    module = RTDetrV2Detector(config, dtype)
    lr = learning_rate_schedule(optim)

    def loss_fn(params, batch_stats, pixel_values, targets: Targets, dn_key):
        denoising = contrastive_denoising_group(
            dn_key, targets.labels, targets.boxes, targets.mask,
            num_classes=config.num_labels, num_queries=config.num_queries, num_denoising=config.num_denoising,
            label_noise_ratio=config.label_noise_ratio, box_noise_scale=config.box_noise_scale,
        )
        outputs, mutated = module.apply({"params": params, "batch_stats": batch_stats}, pixel_values, denoising,
                                        mutable=["batch_stats"])
        loss, terms = rtdetr_loss(outputs, targets, config)
        return loss, (terms, mutated["batch_stats"])

    def train_step(state: TrainState, pixel_values, targets: Targets):
        rng, dn_key = jax.random.split(state.rng)
        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, pixel_values, targets, dn_key
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        d = ema_decay(optim, step)
        new = {"params": params, "batch_stats": batch_stats}
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema, new)
        # the norm of the packed gradients (the optimizer packs the same ones; XLA computes the packing once):
        # one reduction per group instead of one per leaf. Frozen leaves (zero gradient) are left out.
        packed = GroupPacking(state.params, optim.freeze_backbone_batch_norms).pack(grads)
        metrics = {"loss": loss, **terms, "lr": lr(state.step), "grad_norm": optax.tree.norm(packed)}
        state = state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema,
                              rng=rng)
        return state, metrics

    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    train = jax.jit(train_step, in_shardings=(replicated, batch, batch), out_shardings=(replicated, replicated),
                    donate_argnums=(0,))
    return Steps(train, make_eval_steps(config, dtype=dtype, mesh=mesh).eval_step, mesh)


def make_eval_steps(config: RTDetrV2Config, *, dtype: Any = jnp.float32, mesh: Mesh | None = None) -> Steps:
    """Only the eval step (inference with running batch-norm statistics, batch sharded over the mesh)."""
    mesh = data_mesh() if mesh is None else mesh
    module = RTDetrV2Detector(config, dtype)

    def eval_step(variables, pixel_values):
        out = module.apply(variables, pixel_values)
        return out.logits.astype(jnp.float32), out.pred_boxes.astype(jnp.float32)

    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    evaluate = jax.jit(eval_step, in_shardings=(replicated, batch), out_shardings=(batch, batch))
    return Steps(None, evaluate, mesh)


def host_local_batch(global_batch_size: int) -> tuple[int, int]:
    """(start, size) of this host's slice of the global batch in multi-host runs."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {n} hosts")
    size = global_batch_size // n
    return jax.process_index() * size, size
