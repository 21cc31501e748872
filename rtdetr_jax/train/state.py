"""Everything a training run carries from step to step, as one pytree (what checkpoints save)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: () int32 optimizer steps taken; params / batch_stats: the model's variables; opt_state: optax state;
    ema: EMA of `{"params", "batch_stats"}` (used for evaluation and export); rng: PRNG key data (uint32, (2,))."""

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any
    rng: Any

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(variables, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables["params"])
    batch_stats = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables["batch_stats"])
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)  # noqa: E731  (no aliasing with donated buffers)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema={"params": copy(params), "batch_stats": copy(batch_stats)},
        rng=jax.random.PRNGKey(seed),
    )
