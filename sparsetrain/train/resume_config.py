"""A resumed run's config against the one it was saved with.

RUN/config.json is the config the run started with and is never rewritten by a resume. A resume whose
config differs keeps its own as RUN/config.<step>.json (it trains the steps after <step>) and logs the
changes, so the run directory always says what trained each step. A change of the model's parameter
shapes is an error; other changes need `allow_change` (train.py --allow_config_change), except those
that leave the computation alone or are the point of resuming (RESUMABLE_FIELDS).
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.config import RunConfig
from sparsetrain.configbase import from_dict, to_dict
from sparsetrain.errors import InputError

# Where the run lives: a copied or moved run directory resumes as itself.
IGNORED_FIELDS = ("run_dir", "name")
# Changes allowed without --allow_config_change (still logged and kept): training longer, logging,
# evaluation and checkpoint cadence, the device mesh (checkpoints restore onto any mesh), limits.
RESUMABLE_FIELDS = ("trainer.steps", "trainer.progress_bar", "trainer.log_every", "trainer.eval_every",
                    "trainer.eval_batches", "trainer.eval_suite.", "trainer.memory_limit_bytes", "tensorboard",
                    "checkpoint.", "mesh.", "data.on_bad_file")


def _leaves(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        return {k: v for i, x in enumerate(tree) for k, v in _leaves(x, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted field: (old value, new value)} of every leaf that differs (missing = None)."""
    a, b = _leaves(old), _leaves(new)
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key) and not key.startswith(IGNORED_FIELDS)}


def segment_file(run_dir: Path, step: int) -> Path:
    """The config file of the run's segment that trained `step`: the newest config.<s>.json with
    s < step, else config.json."""
    starts = [int(p.name.split(".")[1]) for p in run_dir.glob("config.*.json") if p.name.split(".")[1].isdigit()]
    earlier = [s for s in starts if s < step]
    return run_dir / (f"config.{max(earlier)}.json" if earlier else "config.json")


def _describe(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{key}: {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changes.items())


def check_resume(run_dir: Path, cfg: RunConfig, step: int, allow_change: bool) -> dict[str, tuple]:
    """The changes of `cfg` against the config that trained checkpoint `step`. Raises InputError for a
    change of parameter shapes, or for changes outside RESUMABLE_FIELDS unless `allow_change`."""
    saved_file = segment_file(run_dir, step)
    if not saved_file.is_file():   # a checkpoint copied without its config: nothing to compare
        return {}
    saved = json.loads(saved_file.read_text())
    changes = config_changes(saved, to_dict(cfg))
    model_changes = {k: v for k, v in changes.items() if k.startswith("model.")}
    if model_changes and _shapes(from_dict(RunConfig, saved)) != _shapes(cfg):
        raise InputError(f"{run_dir} was saved with other parameter shapes; it cannot resume with "
                         f"{_describe(model_changes)} (start a new run, e.g. with --init_from {run_dir})")
    refused = {k: v for k, v in changes.items() if not k.startswith(RESUMABLE_FIELDS)}
    if refused and not allow_change:
        raise InputError(f"{run_dir} resumes at step {step} with a config that differs from {saved_file.name}: "
                         f"{_describe(refused)}; pass --allow_config_change to resume with it (kept as "
                         f"config.{step}.json), or start a new run (another name=)")
    return changes


def _shapes(cfg: RunConfig) -> dict:
    return {k: v.shape for k, v in flatten(ModelDef.create(cfg.model).abstract_params()).items()}


def record(run_dir: Path, cfg: RunConfig, step: int, changes: dict[str, tuple], log) -> None:
    """Write config.json for a new run, or config.<step>.json (and log the changes) for a resumed
    one whose config changed."""
    text = json.dumps(to_dict(cfg), indent=2)
    if step == 0 or not (run_dir / "config.json").exists():
        (run_dir / "config.json").write_text(text)
    elif changes:
        (run_dir / f"config.{step}.json").write_text(text)
        log(f"resumed at step {step} with config changes ({_describe(changes)}); kept as config.{step}.json")
