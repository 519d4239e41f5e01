"""Attention over individually selected keys, one list per query token shared by all its heads
(DeepSeek Sparse Attention's top-k tokens), in plain jnp: the reference of `kernel.py` (same
signature) and the implementation off the GPU; and the chunk loop over query rows that bounds its
memory (also used by DSA's indexer passes).

Shapes use B batch, T query length, S key length, N query heads, K kv heads, H head dim, m keys per
list.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def map_query_chunks(fn: Callable, rows: tuple, pad_values: tuple, query_chunk: int):
    """fn over chunks of at most `query_chunk` query rows, one chunk at a time (`lax.map`), each
    chunk rematerialised in the backward pass, so memory holds one chunk's intermediates.

    rows: arrays with the query axis at 1 ([B, T, ...]), padded at the end with `pad_values` to a
    multiple of the chunk. fn(*chunks) -> a pytree of arrays [B, C, ...]; returns them [B, T, ...].
    """
    t = rows[0].shape[1]
    c = min(query_chunk, t)
    n_chunks = -(-t // c)
    if n_chunks == 1:   # one chunk: nothing to bound, and no loop to compile
        return fn(*rows)

    def split(x, value):
        x = jnp.pad(x, [(0, 0), (0, n_chunks * c - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
        return x.reshape(x.shape[0], n_chunks, c, *x.shape[2:]).swapaxes(0, 1)

    out = jax.lax.map(jax.checkpoint(lambda chunks: fn(*chunks)),
                      tuple(split(x, value) for x, value in zip(rows, pad_values)))
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(y.shape[1], n_chunks * c, *y.shape[3:])[:, :t], out)


def gather_rows(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [B, S, ...] at indices int [B, C, m] (entries < 0 read row 0) -> [B, C, m, ...]."""
    return jax.vmap(lambda xb, ib: xb[jnp.maximum(ib, 0)])(x, indices)


def check_selected_keys(q, k, v, indices) -> None:
    """ValueError naming the argument unless shapes and dtypes fit `selected_key_attention`."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H] and k, v [B, S, K, H]; got q{q.shape}, k{k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must match k's shape {k.shape}; got {v.shape}")
    (b, t, n, h), (s, kh) = q.shape, k.shape[1:3]
    if k.shape[0] != b or k.shape[3] != h or n % kh:
        raise ValueError(f"k must be [batch={b}, S, K, head_dim={h}] with K dividing N={n}; got {k.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (b, t) or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be int [batch={b}, seq={t}, m]; got {indices.dtype} {indices.shape}")


def selected_key_attention(q, k, v, indices, *, sm_scale: float | None = None, query_chunk: int = 256,
                           return_lse: bool = False, interpret: bool | None = None):
    """Softmax attention of each query token over its own list of keys, shared by all its heads.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], GQA with query heads i*G..(i+1)*G-1 on kv head i.
      indices: int [B, T, m]: key positions each token attends to; entries < 0 are padding. The
        caller guarantees causality (DSA's selection holds only keys at or before the token).
      sm_scale: logit scale, default 1/sqrt(H).
      query_chunk: query rows per step; memory per step is B * chunk * m * K * H for each of the
        gathered keys and values (and chunk * m * N logits).
      return_lse: also return the natural-log log-sum-exp of each row's scaled logits over its
        keys, f32 [B, N, T]; -inf for rows with no key.
      interpret: unused (the kernel's signature).
    Returns:
      o [B, T, N, H] in q's dtype (rows with no key are 0); with return_lse, (o, lse).
      Differentiable in q, k, v; the indices get no gradient.
    """
    check_selected_keys(q, k, v, indices)
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h) if sm_scale is None else sm_scale

    def chunk(qc, idx):
        keys, values = gather_rows(k, idx), gather_rows(v, idx)                   # [B, C, m, K, H]
        qc = qc.reshape(*qc.shape[:2], kh, g, h)
        logits = jnp.einsum("bckgh,bcmkh->bckgm", qc, keys, preferred_element_type=jnp.float32) * scale
        logits = jnp.where((idx >= 0)[:, :, None, None, :], logits, -jnp.inf)
        top = jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))   # any shift gives the same softmax
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        p = jnp.exp(logits - top)
        total = p.sum(-1, keepdims=True)
        o = jnp.einsum("bckgm,bcmkh->bckgh", p.astype(v.dtype), values, preferred_element_type=jnp.float32)
        o = o / jnp.where(total > 0, total, 1.0)
        lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top, -jnp.inf)[..., 0]
        return o.reshape(*o.shape[:2], n, h).astype(q.dtype), lse.reshape(*lse.shape[:2], n)

    o, lse = map_query_chunks(chunk, (q, indices.astype(jnp.int32)), (0, -1), query_chunk)
    return (o, lse.swapaxes(1, 2)) if return_lse else o
