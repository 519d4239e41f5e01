"""Tiny models with non-trivial random weights, their checkpoints, and JAX reference outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparsetrain.attention.spec import DenseOptions, method_options
from sparsetrain.attention.method import StepContext
from sparsetrain.config import ModelConfig, RopeConfig, RunConfig, TrainerConfig
from sparsetrain.configbase import to_dict
from sparsetrain.export.mapping import unstack_layers
from sparsetrain.checkpoint import save_params
from sparsetrain.checkpoint.model_def import ModelDef, flatten

# GQA ratio 2, non-default RoPE theta and eps (a mapping that drops them shows), float32 compute.
TINY = ModelConfig(vocab_size=320, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=160, max_seq_len=512, rms_eps=1e-6, rope=RopeConfig(theta=500.0), dtype="float32")
# Layer 0 dense, the rest a 2-block window plus one sink block of 32 tokens.
LOCAL_REST = (DenseOptions(), method_options("local", layers="1:", block_size=32, local_blocks=2,
                                            initial_blocks=1))


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def random_params(cfg: ModelConfig, seed: int = 0, *, arange: bool = False):
    """Params in the model's structure: N(0, 0.2) matrices, N(0, 1) embedding, norm scales 1 + N(0, 0.3);
    or, with arange, every element distinct (0, 1, 2, ... continuing across params), so any permutation
    of elements shows."""
    model = ModelDef.create(cfg)
    rng, flat, start = np.random.default_rng(seed), {}, 0
    for path, leaf in flatten(model.abstract_params()).items():
        shape = tuple(leaf.shape)
        if arange:
            flat[path] = np.arange(start, start + int(np.prod(shape)), dtype=np.float32).reshape(shape)
            start += flat[path].size
        elif "norm" in path:
            flat[path] = (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = 1.0 if path == "embed" else 0.2
            flat[path] = (std * rng.standard_normal(shape)).astype(np.float32)
    return model.params_from_flat(flat)


def save_run(directory: Path, cfg: ModelConfig, params, step: int = 7, phases: tuple = ()) -> Path:
    """A params-only checkpoint like a training run's, under directory/run."""
    run = RunConfig(name="run", model=cfg, run_dir=str(directory), trainer=TrainerConfig(phases=phases))
    save_params(directory / "run", step, params, {"step": step, "config": to_dict(run)})
    return directory / "run"


def jax_outputs(cfg: ModelConfig, params, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Logits and transformers-style hidden states (embeddings, each layer's output, and the final
    norm of the last layer's output), float32 at matmul precision "highest"."""
    with jax.default_matmul_precision("highest"):
        logits, _, _ = ModelDef.create(cfg).apply(params, jnp.asarray(tokens))
        plain = dataclasses.replace(cfg, scan_layers=False)
        flat = flatten(params)
        if cfg.scan_layers:
            flat = unstack_layers(flat, cfg.num_layers)
        model = ModelDef.create(plain).bind(ModelDef.create(plain).params_from_flat(flat))
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(model.embed[...], jnp.asarray(tokens), axis=0)
        hidden = [x]
        for block in model.layers:
            x = block(x, positions, None, StepContext())
            hidden.append(x)
        hidden[-1] = model.final_norm(x)
    out = {"tokens": np.asarray(tokens, np.int32), "logits": np.asarray(logits)}
    out.update({f"hidden_{i}": np.asarray(h) for i, h in enumerate(hidden)})
    return out
