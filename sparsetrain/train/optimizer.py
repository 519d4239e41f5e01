"""AdamW with warmup + cosine/WSD schedule, clipping, decay masks, frozen groups and per-group LR."""

from __future__ import annotations

import re

import jax
import optax

from sparsetrain.checkpoint.model_def import Params, flatten, path_str
from sparsetrain.config import ModelConfig, OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    else:  # wsd: warmup, hold at peak, then a linear decay over the last decay_fraction of steps
        decay = max(int(total_steps * cfg.decay_fraction), 1)
        hold = max(total_steps - warmup - decay, 0)
        rest = optax.join_schedules([optax.constant_schedule(peak),
                                     optax.linear_schedule(peak, floor, decay)], [hold])
    # Step n (1-based) uses schedule(n - 1). Warming up from 0 would give step 1 no update at all, so
    # step n of the warm-up gets n / (warmup + 1) of the peak (as nanoGPT does), reaching it after.
    return optax.join_schedules([optax.linear_schedule(peak / (warmup + 1), peak, warmup), rest], [warmup])


def _labels(params: Params, fn) -> Params:
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(path_str(path)), params)


def _first_match(patterns, path: str):
    return next((p for p in patterns if re.search(p, path)), None)


def frozen_paths(cfg: OptimizerConfig, model: ModelConfig, params: Params) -> frozenset[str]:
    """Paths of the parameters that get no update: those matching `cfg.freeze`, and those the
    layers' attention methods freeze. A method whose `param_policy` is "own_only" (gate
    distillation) freezes everything but the parameters of its own layers' methods; "base_only"
    freezes its own parameters (they would get no gradient, only weight decay)."""
    specs = model.layer_specs
    paths = list(flatten(params))

    def layer_and_own(path: str) -> tuple[int, bool]:
        parts = path.split("/")
        if parts[0] != "layers":
            return -1, False
        layer = int(parts[1]) if parts[1].isdigit() else 0   # scanned layers share one rule
        return layer, "/attn/attend/" in path

    frozen = {p for p in paths if _first_match(cfg.freeze, p)}
    distilling = any(spec.param_policy == "own_only" for spec in specs)
    for path in paths:
        layer, own = layer_and_own(path)
        policy = specs[layer].param_policy if layer >= 0 else "all"
        if (distilling and not (own and policy == "own_only")) or (own and policy == "base_only"):
            frozen.add(path)
    return frozenset(frozen)


def make_optimizer(cfg: OptimizerConfig, params: Params, total_steps: int,
                   frozen: frozenset[str] = frozenset()) -> optax.GradientTransformation:
    """The full update rule. `frozen` parameters (see `frozen_paths`) get exactly zero updates (their
    optimizer state is not even allocated), `cfg.no_decay` ones get no weight decay, and
    `lr_multipliers` ("regex=x") scale the learning rate of matching groups."""
    schedule = learning_rate_schedule(cfg, total_steps)
    multipliers = [(p, float(m)) for p, m in (item.rsplit("=", 1) for item in cfg.lr_multipliers)]

    def group_of(path: str) -> str:
        if path in frozen:
            return "frozen"
        match = next((i for i, (p, _) in enumerate(multipliers) if re.search(p, path)), None)
        return "base" if match is None else f"group{match}"

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.adamw(lambda step: scale * schedule(step), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda p: _labels(p, lambda path: not _first_match(cfg.no_decay, path)))

    labels = _labels(params, group_of)
    transforms = {"frozen": optax.set_to_zero(), "base": adamw(1.0)}
    transforms.update({f"group{i}": adamw(m) for i, (_, m) in enumerate(multipliers)})
    # Frozen gradients are zeroed before clipping so they do not shrink the trained parameters' steps.
    chain = [optax.masked(optax.set_to_zero(), jax.tree.map(lambda g: g == "frozen", labels))]
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    return optax.chain(*chain, optax.multi_transform(transforms, labels))
