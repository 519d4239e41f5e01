"""Block selection helpers: scores -> bool block masks, and masks <-> sorted index lists.

Every function works on the last two axes [..., nQ, nK] (query blocks, key blocks) and
broadcasts over leading axes such as [B, H]. Arrays in, arrays out.

`valid` says which tiles may be selected at all. Its default is block-level causality aligned at
the end, key block j allowed for query block i iff j <= i + (nK - nQ): exact when T and S are
multiples of the block size. For ragged lengths pass `causal_block_mask(T, S, bs)`, and for
non-causal attention `valid=True`.

Forced blocks (always kept, counted inside a top-k budget): per row, the first `force_first`
valid blocks (attention sinks / initial tokens) and the last `force_local` valid blocks (the
local window ending at the diagonal block, under causality). force_local=1 keeps the diagonal,
so every query sees at least itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.common import mask_to_indices as _sorted_indices


def causal_block_mask(seq_q: int, seq_kv: int, block_size: int):
    """bool [nQ, nK]: tiles holding at least one visible (query, key) pair, end-aligned causal."""
    n_q, n_k = -(-seq_q // block_size), -(-seq_kv // block_size)
    last_row = np.minimum((np.arange(n_q) + 1) * block_size, seq_q) - 1
    return jnp.asarray(np.arange(n_k)[None, :] * block_size <= last_row[:, None] + seq_kv - seq_q)


def _valid(shape, valid):
    n_q, n_k = shape[-2:]
    if valid is None:
        valid = np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + (n_k - n_q)
    return jnp.broadcast_to(jnp.asarray(valid, bool), shape)


def forced_block_mask(valid, *, force_first: int = 0, force_local: int = 1):
    """bool like `valid`: per row, its first `force_first` and last `force_local` valid blocks."""
    valid = jnp.asarray(valid, bool)
    from_start = jnp.cumsum(valid, axis=-1)
    from_end = jnp.flip(jnp.cumsum(jnp.flip(valid, -1), axis=-1), -1)
    return valid & ((from_start <= force_first) | (from_end <= force_local))


def topk_block_mask(scores, k: int, *, force_first: int = 0, force_local: int = 1, valid=None):
    """Per row, the forced blocks plus the highest-scoring others, `k` blocks in all.

    scores: float [..., nQ, nK], higher is better; -inf or NaN scores are never picked by score.
    Rows with fewer than k valid blocks keep them all; if the forced blocks exceed k, all forced
    blocks are still kept. Ties go to the lower block index (lax.top_k is stable).
    """
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    valid = _valid(scores.shape, valid)
    forced = forced_block_mask(valid, force_first=force_first, force_local=force_local)
    rest = jnp.where(valid & ~forced & ~jnp.isnan(scores), scores, -jnp.inf)
    kk = min(k, scores.shape[-1])
    if kk == 0:
        return forced
    values, cols = jax.lax.top_k(rest, kk)
    budget = k - forced.sum(-1, keepdims=True)
    take = (jnp.arange(kk) < budget) & (values > -jnp.inf)
    picked = jnp.put_along_axis(jnp.zeros(scores.shape, bool), cols, take, axis=-1, inplace=False)
    return forced | picked


def threshold_block_mask(scores, threshold: float, *, force_first: int = 0, force_local: int = 1,
                         valid=None):
    """Forced blocks plus every valid block whose score exceeds `threshold` (SeerAttention's tau)."""
    valid = _valid(scores.shape, valid)
    forced = forced_block_mask(valid, force_first=force_first, force_local=force_local)
    return forced | (valid & (scores > threshold))


def topp_block_mask(probs, p: float, *, force_first: int = 0, force_local: int = 1, valid=None):
    """Forced blocks first, then the most probable valid blocks until the kept mass reaches `p`.

    probs: float [..., nQ, nK], e.g. a softmax over each row's valid blocks (not renormalised
    here). A block is kept when the mass of the blocks ranked before it is still below p, so the
    kept set is the smallest prefix of the ranking with mass >= p (or all valid blocks).
    """
    valid = _valid(probs.shape, valid)
    forced = forced_block_mask(valid, force_first=force_first, force_local=force_local)
    rank_key = jnp.where(forced, jnp.inf, jnp.where(valid, probs, -jnp.inf))
    n_k = probs.shape[-1]
    _, order = jax.lax.top_k(rank_key, n_k)  # a full descending sort, stable on ties
    mass = jnp.take_along_axis(jnp.where(valid, probs, 0.0), order, axis=-1)
    before = jnp.cumsum(mass, axis=-1) - mass
    keep = jnp.take_along_axis(valid, order, axis=-1) & (before < p)
    kept = jnp.put_along_axis(jnp.zeros(probs.shape, bool), order, keep, axis=-1, inplace=False)
    return forced | kept


def mask_to_indices(mask, max_blocks: int | None = None):
    """Sorted lists of the selected key blocks of each row, in the NSA/FSA layout.

    mask: bool [..., nQ, nK] -> (indices int32 [..., nQ, max_blocks or nK], ascending, padded
    with -1; counts int32 [..., nQ]). With max_blocks, rows holding more keep their lowest
    max_blocks indices (and count). Cost is linear in the mask (a cumsum and a scatter).
    """
    idx = _sorted_indices(jnp.asarray(mask, bool))
    counts = jnp.asarray(mask, bool).sum(-1, dtype=jnp.int32)
    if max_blocks is not None:
        idx, counts = idx[..., :max_blocks], jnp.minimum(counts, max_blocks)
    return idx, counts


def indices_to_mask(indices, num_blocks: int):
    """Inverse of `mask_to_indices`: int [..., nQ, m] (entries < 0 ignored) -> bool [..., nQ, nK]."""
    indices = jnp.asarray(indices)
    cols = jnp.where(indices < 0, num_blocks, indices)  # out of range: dropped
    return jnp.put_along_axis(jnp.zeros((*indices.shape[:-1], num_blocks), bool), cols, True,
                              axis=-1, inplace=False, mode="drop")


def transposed_indices(mask, max_blocks: int | None = None):
    """For each key block, the sorted query blocks that selected it (the dk/dv loop order).

    mask: bool [..., nQ, nK] -> (indices int32 [..., nK, max_blocks or nQ], counts [..., nK]).
    """
    return mask_to_indices(jnp.swapaxes(jnp.asarray(mask, bool), -1, -2), max_blocks)
