"""Load trained (or imported) weights as a ready model: `sparsetrain.load_pretrained(path)`.

    model, cfg = sparsetrain.load_pretrained("runs/tiny")         # a run, or any checkpoint dir
    logits = model(tokens)                                         # int32 [B, T] -> float32 [B, T, V]

`path` is a run directory (its latest checkpoint), its `checkpoints/` folder, one step's folder, a
folder written by `python -m sparsetrain.export.import_hf`, or a Hugging Face Llama folder (imported in
memory).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsetrain.config import DTypeName, RunConfig
from sparsetrain.configbase import from_dict
from sparsetrain.export.import_hf import read_hf
from sparsetrain.checkpoint import load_params
from sparsetrain.checkpoint.model_def import ModelDef, flatten


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: config.json with a `model_type` (run configs have none)."""
    config = Path(path) / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def load_checkpoint(path: str | Path) -> tuple[RunConfig, dict[str, np.ndarray], dict]:
    """The run config, flat params ({"layers/0/attn/q_proj": array, ...}, host numpy) and metadata
    (step, ...) of a checkpoint; the params are checked against the model the config builds."""
    params, meta = load_params(path)
    cfg = from_dict(RunConfig, meta["config"])
    # Restored layer keys are strings; going through the model's own paths normalises and checks them.
    checked = ModelDef.create(cfg.model).params_from_flat(flatten(params))
    return cfg, {key: np.asarray(value) for key, value in flatten(checked).items()}, meta


def load_pretrained(path: str | Path, *, dtype: DTypeName | None = None) -> tuple[nnx.Module, RunConfig]:
    """A live NNX model (call it on int32 tokens [B, T] for float32 logits [B, T, V]) and its config.

    dtype overrides the compute dtype (`model.dtype`, e.g. "float32" on CPU); weights stay float32.
    """
    if is_hf_folder(path):
        cfg, flat = read_hf(path)
    else:
        cfg, flat, _ = load_checkpoint(path)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    model_def = ModelDef.create(cfg.model)
    params = model_def.params_from_flat({key: jnp.asarray(value) for key, value in flat.items()})
    return model_def.bind(params), cfg
