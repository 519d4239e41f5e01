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
from sparsetrain.train.model_state import Params, flatten, path_str

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


def save_params(directory: Path, step: int, params: Params, meta: dict, *, keep: int | None = None) -> Path:
    """A parameters-only checkpoint in the same layout: what importers write for --init_from, and the
    best-by-validation copy (keep=1)."""
    manager = ocp.CheckpointManager(Path(directory).absolute() / "checkpoints", item_names=("params", "meta"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=keep))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    return manager.directory


def load_params(path: str | Path) -> tuple[Params, dict]:
    """Parameters and metadata of the latest checkpoint of a run directory (or its checkpoints/ dir,
    or one step's directory), as host arrays."""
    path = Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    step = None
    if path.name.isdigit() and (path / "params").exists():
        path, step = path.parent, int(path.name)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} does not exist")
    manager = ocp.CheckpointManager(path, item_names=("params", "meta"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no complete checkpoint under {path}")
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                               meta=ocp.args.JsonRestore()))
    manager.close()
    return restored["params"], dict(restored["meta"])


def merge_init_params(fresh: Params, source: Params) -> tuple[Params, list[str], list[str]]:
    """Take every parameter of `fresh` from `source` where it exists (shapes must agree).

    Returns the merged params, the paths initialised fresh (new parts such as gates), and the source
    paths that were not used."""
    src = flatten(source)
    missing, merged = [], {}

    def pick(path, value):
        key = path_str(path)
        if key not in src:
            missing.append(key)
            return value
        if tuple(src[key].shape) != tuple(value.shape):
            raise ValueError(f"--init_from: parameter {key} has shape {tuple(src[key].shape)} in the "
                             f"source but {tuple(value.shape)} in this model")
        merged[key] = True
        return np.asarray(src[key]).astype(value.dtype)

    out = jax.tree_util.tree_map_with_path(pick, fresh)
    unused = sorted(k for k in src if k not in merged)
    return out, missing, unused
