"""Rotary position embeddings in the half-split (Hugging Face `rotate_half`) layout.

Half-split pairs channel i with channel i + H/2 of each head, so exported q/k projections need no row
permutation for PyTorch. Context-extension scalings follow transformers' `modeling_rope_utils`
(`rope_type` "linear", "yarn", "llama3"; our "ntk" is the static NTK-aware base change, which
exports as a plain `rope_theta`), so an exported model computes the same angles:

- linear (position interpolation, Chen et al. 2023): every frequency / s.
- ntk (bloc97): base theta * s^(H / (H - 2)), so the lowest frequency is interpolated by s and the
  highest kept.
- yarn (Peng et al. 2023, "NTK-by-parts"): pairs with more than beta_fast rotations over the original
  context keep their frequency, pairs with fewer than beta_slow are divided by s, a linear ramp in
  between; cos/sin are multiplied by the attention factor 0.1 ln(s) + 1 (so q.k logits by its square).
- llama3: wavelengths longer than L/low_freq_factor are divided by s, shorter than
  L/high_freq_factor kept, a smooth blend in between (L = original_max_len).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsetrain.config import RopeConfig


def _plain(theta: float, head_dim: int) -> jax.Array:
    # 1 / theta^(2i/H) in this order of operations, as transformers computes it (same float32 rounding).
    return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def ntk_theta(cfg: RopeConfig, head_dim: int) -> float:
    """The base that NTK-aware scaling rotates with (the `rope_theta` an export writes)."""
    return cfg.theta * cfg.factor ** (head_dim / (head_dim - 2))


def yarn_attention_factor(cfg: RopeConfig) -> float:
    """YaRN's cos/sin multiplier sqrt(1/t) = 0.1 ln(s) + 1 (1 for s <= 1), unless set explicitly."""
    if cfg.attention_factor:
        return cfg.attention_factor
    return 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0


def yarn_ramp_bounds(cfg: RopeConfig, head_dim: int) -> tuple[float, float]:
    """Pair indices (low, high) where YaRN's ramp runs: a pair index d has H ln(L / (2 pi r)) / (2 ln theta)
    with r rotations over the original context L; floored/ceiled and clipped to [0, H - 1] as transformers'
    `find_correction_range(truncate=True)` does."""
    def pair_index(rotations: float) -> float:
        return head_dim * math.log(cfg.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))
    low, high = math.floor(pair_index(cfg.beta_fast)), math.ceil(pair_index(cfg.beta_slow))
    return max(low, 0), min(high, head_dim - 1)


def _yarn(cfg: RopeConfig, head_dim: int) -> jax.Array:
    low, high = yarn_ramp_bounds(cfg, head_dim)
    if low == high:
        high += 0.001   # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp       # 1: keep the frequency (fast pairs), 0: divide it by s (slow pairs)
    pos_freqs = cfg.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return (1.0 / (cfg.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def _llama3(cfg: RopeConfig, head_dim: int) -> jax.Array:
    freqs = _plain(cfg.theta, head_dim)
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = cfg.original_max_len / cfg.low_freq_factor
    high_freq_wavelen = cfg.original_max_len / cfg.high_freq_factor
    scaled = jnp.where(wavelen > low_freq_wavelen, freqs / cfg.factor, freqs)
    smooth = (cfg.original_max_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, blended, scaled)


def inverse_frequencies(cfg: RopeConfig, head_dim: int) -> jax.Array:
    """Per-pair angular frequencies [H/2], float32."""
    if cfg.scaling == "none":
        return _plain(cfg.theta, head_dim)
    if cfg.scaling == "linear":
        return _plain(cfg.theta, head_dim) / cfg.factor
    if cfg.scaling == "ntk":
        return _plain(ntk_theta(cfg, head_dim), head_dim)
    if cfg.scaling == "yarn":
        return _yarn(cfg, head_dim)
    if cfg.scaling == "llama3":
        return _llama3(cfg, head_dim)
    raise NotImplementedError(f"rope.scaling={cfg.scaling!r}")  # unreachable: the config validates it


def attention_factor(cfg: RopeConfig) -> float:
    """The multiplier on cos and sin (transformers' `attention_scaling`): YaRN's temperature, else 1."""
    return yarn_attention_factor(cfg) if cfg.scaling == "yarn" else 1.0


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig) -> jax.Array:
    """Rotate x [B, T, N, H] by positions [B, T]; computed in float32, returned in x's dtype."""
    freqs = inverse_frequencies(cfg, x.shape[-1])
    angles = positions[..., None].astype(jnp.float32) * freqs        # [B, T, H/2]
    # Scaling cos/sin scales both q and k, so YaRN's factor reaches the logits squared, as in transformers.
    scale = attention_factor(cfg)
    cos, sin = jnp.cos(angles)[:, :, None, :] * scale, jnp.sin(angles)[:, :, None, :] * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
