"""Training checkpoints with orbax-checkpoint: the whole `TrainState` (params, optimizer state, EMA, step, RNG)
plus a JSON record of the data-loader position and the run's settings.

Two managers: `last/` keeps the newest K (saved every N steps and at each epoch end), `best/` keeps the single
best by evaluation AP. A run restored from `last/` continues with exactly the state and batches it would have had.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, asynchronous: bool = True):
        directory = os.path.abspath(os.fspath(directory))
        self.directory = directory
        self.last = ocp.CheckpointManager(
            os.path.join(directory, "last"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(directory, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["AP"], best_mode="max",
                                                 enable_async_checkpointing=asynchronous),
        )

    @staticmethod
    def _args(state, meta: dict):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, meta: dict) -> None:
        if step in self.last.all_steps():
            return
        self.last.save(step, args=self._args(state, meta), force=True)

    def save_best(self, step: int, state, meta: dict, metrics: dict[str, float]) -> None:
        self.best.save(step, args=self._args(state, meta), metrics={"AP": float(metrics["AP"])}, force=True)

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def restore(self, abstract_state, step: int | None = None, best: bool = False) -> tuple[Any, dict]:
        """Restore onto the shapes, dtypes and shardings of `abstract_state` (e.g. a freshly created state)."""
        manager = self.best if best else self.last
        step = (manager.best_step() if best else manager.latest_step()) if step is None else step
        if step is None:
            raise FileNotFoundError(f"{manager.directory}: no checkpoint to restore")
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
        except ValueError as err:
            if "do not match" not in str(err):
                raise
            # orbax explains over several lines; one line, naming the checkpoint
            raise ValueError(f"{os.path.join(manager.directory, str(step))}: the saved training state does not fit "
                             f"this run's (another model config or optimizer, or a checkpoint written before "
                             f"rtdetr-jax packed the optimizer state by parameter group): "
                             f"{' '.join(str(err).split())}") from None
        return restored["state"], restored["meta"]

    def restore_arrays(self, step: int, best: bool = False) -> tuple[dict, dict]:
        """The saved state as a nested dict of arrays (no target needed), and the JSON record."""
        manager = self.best if best else self.last
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()
