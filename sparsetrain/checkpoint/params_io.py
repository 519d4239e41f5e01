"""Parameter-only checkpoints: what imports write for `--init_from`, keep-best copies, export and
`load_pretrained` read. Same orbax layout as the training checkpoints (DIR/checkpoints/<step>/params),
so a training run's directory is also a parameter checkpoint. Below both train and export.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparsetrain.checkpoint.model_def import Params, flatten, path_str
from sparsetrain.errors import InputError


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


def locate_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(the checkpoints/ directory, step) of the latest checkpoint of a run directory, of its
    checkpoints/ folder, or of one step's folder; InputError if there is none."""
    path = Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "params").exists():
        return path.parent, int(path.name)
    if not path.is_dir():
        raise InputError(f"checkpoint path {path} does not exist")
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").exists()]
    if not steps:
        raise InputError(f"no complete checkpoint under {path}")
    return path, max(steps)


def load_params(path: str | Path) -> tuple[Params, dict]:
    """Parameters and metadata of the checkpoint `locate_checkpoint` finds, as host arrays."""
    directory, step = locate_checkpoint(path)
    manager = ocp.CheckpointManager(directory, item_names=("params", "meta"))
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
            raise InputError(f"--init_from: parameter {key} has shape {tuple(src[key].shape)} in the "
                             f"source but {tuple(value.shape)} in this model")
        merged[key] = True
        return np.asarray(src[key]).astype(value.dtype)

    out = jax.tree_util.tree_map_with_path(pick, fresh)
    unused = sorted(k for k in src if k not in merged)
    return out, missing, unused
