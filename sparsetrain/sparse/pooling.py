"""Pooling over blocks of tokens, shared by the block-routing methods (seer, moba).

Blocks are consecutive runs of `block_size` tokens from position 0; the last one may be partial and
is pooled over its real tokens only (ceil mode). Axis legend as in sparsetrain/attention/method.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pool_blocks(x: jax.Array, block_size: int, kinds: tuple[str, ...] = ("avg",),
                tokens: jax.Array | None = None) -> jax.Array:
    """[B, T, M, H] -> [B, nB, M, len(kinds) * H]: per block of `block_size` tokens (the last one
    possibly partial, pooled over its real tokens), the poolings in `kinds` ("avg", "max", "min")
    concatenated on the feature axis. float32.

    tokens: bool [B, T], the tokens that count (default all); every block must keep at least one.
    Packed documents pool each block over one of its documents (sparsetrain/attention/documents.py).
    """
    b, t, m, h = x.shape
    n = -(-t // block_size)
    x = x.astype(jnp.float32)
    keep = jnp.ones((1, t), bool) if tokens is None else tokens
    keep = jnp.pad(keep, ((0, 0), (0, n * block_size - t))).reshape(keep.shape[0], n, block_size, 1, 1)
    x = jnp.pad(x, ((0, 0), (0, n * block_size - t), (0, 0), (0, 0))).reshape(b, n, block_size, m, h)
    count = keep.sum(2)
    pooled = {"avg": lambda: jnp.where(keep, x, 0.0).sum(2) / count,
              "max": lambda: jnp.where(keep, x, -jnp.inf).max(2),
              "min": lambda: jnp.where(keep, x, jnp.inf).min(2)}
    return jnp.concatenate([pooled[kind]() for kind in kinds], axis=-1)


def lag_blocks(pooled: jax.Array) -> jax.Array:
    """[B, nB, ...] -> the same with block i holding block i-1's value (block 0 gets zeros): a
    causal query pool, so that a block's routing reads only tokens strictly before it."""
    return jnp.pad(pooled[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (pooled.ndim - 2))
