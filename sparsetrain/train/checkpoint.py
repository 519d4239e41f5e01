"""Checkpoints with orbax: parameters, optimizer state, data-iterator position, step and config.

Layout: RUN_DIR/checkpoints/<step>/{params, opt_state, data, meta}. Orbax writes each save into a
temporary directory and renames it only once complete, so a crash or kill -9 mid-save leaves the last
good checkpoint as the latest one; `latest_step()` never sees a partial save.
"""

from __future__ import annotations

from pathlib import Path
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from sparsetrain.config import CheckpointConfig

ITEMS = ("params", "opt_state", "data", "meta")


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: CheckpointConfig):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iter, meta: dict, *, force: bool = False) -> None:
        """Start a save (async if configured); the previous async save is finished first."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: dict, shardings: dict, data_iter) -> tuple[dict, dict]:
        """State placed on `shardings` (any mesh: orbax reshards), and the saved metadata. The data
        iterator is moved to the saved position in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_state["params"], shardings["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(abstract_state["opt_state"],
                                                         shardings["opt_state"])),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"])
        state = {"params": restored["params"], "opt_state": restored["opt_state"],
                 "step": jax.device_put(np.int32(meta["step"]), shardings["step"])}
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
