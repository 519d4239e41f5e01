"""Rotary position embeddings in the half-split (Hugging Face `rotate_half`) layout.

Half-split pairs channel i with channel i + H/2 of each head, so exported q/k projections need no row
permutation for PyTorch. Context-extension scalings (linear/PI, NTK, YaRN) plug in at
`inverse_frequencies`, the one place that turns a RopeConfig into per-pair frequencies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsetrain.config import RopeConfig


def inverse_frequencies(cfg: RopeConfig, head_dim: int) -> jax.Array:
    """Per-pair angular frequencies [H/2], float32."""
    base = cfg.theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if cfg.scaling == "none":
        return base
    raise NotImplementedError(f"rope.scaling={cfg.scaling!r}")  # unreachable: the config validates it


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig) -> jax.Array:
    """Rotate x [B, T, N, H] by positions [B, T]; computed in float32, returned in x's dtype."""
    freqs = inverse_frequencies(cfg, x.shape[-1])
    angles = positions[..., None].astype(jnp.float32) * freqs        # [B, T, H/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
