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


def create_train_state(variables, tx: optax.GradientTransformation, seed: int = 0,
                       param_dtype=jnp.float32) -> TrainState:
    """Parameters are kept in `param_dtype` (float32; float64 under x64 for exactness tests)."""
    # fresh buffers (jnp.array copies): the train step donates the state, which must not free the caller's arrays
    copy = lambda t: jax.tree_util.tree_map(lambda a: jnp.array(a, param_dtype), t)  # noqa: E731
    params = copy(variables["params"])
    batch_stats = copy(variables["batch_stats"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema={"params": copy(params), "batch_stats": copy(batch_stats)},
        rng=jax.random.PRNGKey(seed),
    )
