"""The learned per-key score that DMA and NOSA share: b[h, j] = A[h] * softplus(W_delta v_j).

Per KV head h and key j, from the key's value vector (all KV heads of token j, flattened): DMA's
"dynamic mask" bias (arXiv 2508.02124, the log form of its exp(A * softplus(.))) and NOSA's eviction
score (arXiv 2510.13602). Both add it to the attention logits through the kernel's `key_bias`, so
A and W_delta train through dBias; both also choose key blocks by it, a choice that gets no
gradient (the block scores here are cut from the graph).

A starts at 0 (as upstream): the bias is then 0, every block scores the same, and the selection
falls back to ties (the lowest blocks win, as lax.top_k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsetrain import ops

# Parameter names, shared with the export tables and the torch files (upstream: `A`, `dt_proj`).
SCALE, PROJECTION = "key_score_scale", "key_score_proj"


def parameter_shapes(num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """{name: shape}: A [K] and W_delta [K * H, K] (input: the token's values of every kv head)."""
    return {SCALE: (num_kv_heads,), PROJECTION: (num_kv_heads * head_dim, num_kv_heads)}


def add_parameters(module: nnx.Module, num_kv_heads: int, head_dim: int, rngs: nnx.Rngs) -> None:
    """Gives a method module A (zeros) and W_delta (N(0, 0.02)) as its own parameters (flat names,
    as the export tables and the torch files name them)."""
    shapes = parameter_shapes(num_kv_heads, head_dim)
    setattr(module, SCALE, nnx.Param(jnp.zeros(shapes[SCALE], jnp.float32), out_sharding=("kv_heads",),
                                     eager_sharding=False))
    setattr(module, PROJECTION, nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shapes[PROJECTION],
                                                                        jnp.float32),
                                          out_sharding=(None, "kv_heads"), eager_sharding=False))


def key_bias(module: nnx.Module, v: jax.Array) -> jax.Array:
    """b = A * softplus(v W_delta) of a module given `add_parameters`: v [B, S, K, H] -> f32 [B, K, S]."""
    delta = v.reshape(*v.shape[:2], -1).astype(jnp.float32) @ getattr(module, PROJECTION)[...]   # [B, S, K]
    return jnp.swapaxes(getattr(module, SCALE)[...] * jax.nn.softplus(delta), 1, 2)


def block_max(bias: jax.Array, block_size: int) -> jax.Array:
    """[B, K, S] -> f32 [B, K, nK]: each key block's highest score over its real keys, without
    gradient (the selection is not differentiated)."""
    b, kh, s = bias.shape
    n_k = -(-s // block_size)
    padded = jnp.pad(jax.lax.stop_gradient(bias), ((0, 0), (0, 0), (0, n_k * block_size - s)),
                     constant_values=-jnp.inf)
    return padded.reshape(b, kh, n_k, block_size).max(-1)


def fill_blocks(chosen: jax.Array, scores: jax.Array, budget: int, valid) -> jax.Array:
    """bool [B, K, nQ, nK]: the `chosen` blocks of each query tile plus its valid others of highest
    score (query-agnostic scores f32 [B, K, nK]; ties to the lower block) up to `budget` blocks in
    all; rows already over budget keep what they chose."""
    valid = valid & ~chosen
    rows = jnp.broadcast_to(scores[:, :, None, :], chosen.shape)
    room = budget - chosen.sum(-1)
    return chosen | ops.budget_block_mask(rows, room, force_first=0, force_local=0, valid=valid)
