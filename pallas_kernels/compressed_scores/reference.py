"""Pure-jnp reference of `kernel.token_block_scores`, with the same signature.

Runs over chunks of `query_chunk` queries so that the per-token window scores never exceed
[chunk, nW] per head; it is the "xla" implementation and the ground truth for the kernel's tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.compressed_scores.common import Windows, check, overlap_weight


def visible_windows(positions: jax.Array, n_windows: int, size: int, stride: int) -> jax.Array:
    """bool [C, nW]: window c has ended by token t (c * stride + size - 1 <= t)."""
    return jnp.arange(n_windows)[None, :] * stride + size - 1 <= positions[:, None]


def pool_to_blocks(window_scores: jax.Array, n_blocks: int, w: Windows) -> jax.Array:
    """f32 [..., nW] -> [..., nK]: each key block's max over the fine windows overlapping it, i.e.
    windows c with c*stride < (j+1)*block and c*stride + size > j*block. Scores are >= 0, so the
    zero padding never wins."""
    r, u = w.per_block, w.per_window
    width = n_blocks * r
    s = jnp.pad(window_scores, [(0, 0)] * (window_scores.ndim - 1) + [(u - 1, 0)])
    s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, max(0, width + u - 1 - s.shape[-1]))])
    # Window c covers stride-chunks c ... c + u - 1. Entry c' of `covering` is the max over the
    # windows that cover chunk c' (c' - u + 1 ... c'); block j owns chunks j*r ... (j+1)*r - 1, so
    # its max over those entries is its overlap max.
    covering = s[..., u - 1:u - 1 + width]
    for shift in range(1, u):
        covering = jnp.maximum(covering, s[..., u - 1 - shift:u - 1 - shift + width])
    return covering.reshape(*covering.shape[:-1], n_blocks, r).max(-1)


def overlap_pool(window_scores: jax.Array, n_blocks: int, w: Windows) -> jax.Array:
    """f32 [..., nW] -> [..., nK]: each key block's sum over the windows overlapping it, weighted by
    the stride-chunks each shares with the block (NSA's importance, `common.overlap_weight`)."""
    r, u = w.per_block, w.per_window
    left = u - 1
    padded = jnp.pad(window_scores, [(0, 0)] * (window_scores.ndim - 1)
                     + [(left, max(0, n_blocks * r - window_scores.shape[-1]))])
    total = 0.0
    for offset in range(1 - u, r):   # window j*r + offset of block j, for every block at once
        begin = offset + left
        total = total + overlap_weight(offset, w) * padded[..., begin:begin + n_blocks * r:r]
    return total


def _seen(positions, doc_start, n_windows: int, size: int, stride: int):
    """bool [B, 1, 1, C, nW]: windows ended by each token and starting in its document."""
    inside = jnp.arange(n_windows)[None, None, :] * stride >= doc_start[:, :, None]
    return (visible_windows(positions, n_windows, size, stride)[None] & inside)[:, None, None]


def _chunk_scores(q, positions, doc_start, fine, coarse, n_blocks: int, w: Windows, scale: float, pool: str):
    """f32 [B, K, C, nK] for the queries q [B, C, N, D] at `positions` [C], whose documents start
    at doc_start [B, C]."""
    b, c, n, d = q.shape
    kh = fine.shape[2]
    qg = q.reshape(b, c, kh, n // kh, d)
    dot = lambda keys: jnp.einsum("bckgd,bwkd->bkgcw", qg, keys, preferred_element_type=jnp.float32) * scale
    coarse_seen = _seen(positions, doc_start, coarse.shape[1], w.coarse_size, w.coarse_stride)
    lse = jax.nn.logsumexp(jnp.where(coarse_seen, dot(coarse), -jnp.inf), axis=-1)     # [B, K, G, C]
    has_lse = jnp.isfinite(lse)[..., None]
    fine_seen = _seen(positions, doc_start, fine.shape[1], w.size, w.stride)
    p = jnp.exp(dot(fine) - jnp.where(has_lse, lse[..., None], 0.0))
    return (pool_to_blocks if pool == "max" else overlap_pool)(jnp.where(fine_seen & has_lse, p, 0.0).sum(2),
                                                               n_blocks, w)


def token_block_scores(q, fine, coarse, *, block_size, kernel_size, kernel_stride, coarse_size,
                       coarse_stride, doc_start=None, sm_scale=None, query_chunk=512, pool="max",
                       interpret=False):
    """Reference of `kernel.token_block_scores` (same arguments, shapes and semantics)."""
    del interpret
    w = Windows(block_size, kernel_size, kernel_stride, coarse_size, coarse_stride)
    check(q, fine, coarse, w, doc_start, pool)
    b, t, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    n_blocks = -(-t // block_size)
    chunk = min(query_chunk, t)
    n_chunks = -(-t // chunk)
    q = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - t), (0, 0), (0, 0)))
    q_chunks = q.reshape(b, n_chunks, chunk, n, d).swapaxes(0, 1)
    doc_start = jnp.zeros((b, t), jnp.int32) if doc_start is None else doc_start
    doc_chunks = jnp.pad(doc_start, ((0, 0), (0, n_chunks * chunk - t))).reshape(b, n_chunks, chunk).swapaxes(0, 1)
    fine, coarse = fine.astype(q.dtype), coarse.astype(q.dtype)
    one = lambda args: _chunk_scores(args[0], args[1] + jnp.arange(chunk), args[2], fine, coarse, n_blocks, w,
                                     scale, pool)
    out = jax.lax.map(one, (q_chunks, jnp.arange(n_chunks) * chunk, doc_chunks))   # [nC, B, K, C, nK]
    return out.transpose(1, 2, 0, 3, 4).reshape(b, fine.shape[2], n_chunks * chunk, n_blocks)[:, :, :t]
