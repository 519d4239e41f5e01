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

# The tile classes, the selection type and its list conversions live beside the kernels that read them.
from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.selection import Selection, indices_to_mask
from pallas_kernels.block_sparse.selection import mask_to_lists as mask_to_indices

__all__ = ["Selection", "budget_block_mask", "causal_block_mask", "forced_block_mask", "indices_to_mask",
           "mask_to_indices", "selection_density", "selection_recall", "threshold_block_mask",
           "tile_weights", "topk_block_lists", "topk_block_mask", "topp_block_mask", "transposed_indices",
           "window_block_mask"]


def causal_block_mask(seq_q: int, seq_kv: int, block_size: int):
    """bool [nQ, nK]: tiles holding at least one visible (query, key) pair, end-aligned causal."""
    n_q, n_k = -(-seq_q // block_size), -(-seq_kv // block_size)
    last_row = np.minimum((np.arange(n_q) + 1) * block_size, seq_q) - 1
    return jnp.asarray(np.arange(n_k)[None, :] * block_size <= last_row[:, None] + seq_kv - seq_q)


def window_block_mask(seq_q: int, seq_kv: int, block_size: int, window: int):
    """bool [nQ, nK]: tiles holding at least one visible (query, key) pair, end-aligned causal with
    a sliding window of `window` keys (`block_sparse_attention(..., window=window)`): the band a
    sliding-window branch selects. window >= seq_kv gives `causal_block_mask`."""
    window = common.check_window(window, True, seq_kv)
    dims = common.Dims(1, seq_q, seq_kv, 1, 1, 1, 1, block_size)  # only lengths and block matter
    return jnp.asarray(common.tile_classes(dims, True, window)[0])


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


def budget_block_mask(scores, budget, *, force_first: int = 0, force_local: int = 1, valid=None):
    """Per row, the forced blocks plus the highest-scoring others, `budget` blocks in all.

    scores: float [..., nQ, nK], higher is better; -inf or NaN scores are never picked by score.
    budget: int, or int array broadcastable to [..., nQ] (a per-row budget). Rows with fewer valid
    blocks keep them all; if the forced blocks exceed the budget, all forced blocks are still kept.
    Ties go to the lower block index (lax.top_k is stable).
    """
    valid = _valid(scores.shape, valid)
    forced = forced_block_mask(valid, force_first=force_first, force_local=force_local)
    rest = jnp.where(valid & ~forced & ~jnp.isnan(scores), scores, -jnp.inf)
    values, cols = jax.lax.top_k(rest, scores.shape[-1])   # a full descending sort, per row
    room = jnp.asarray(budget)[..., None] - forced.sum(-1, keepdims=True)
    take = (jnp.arange(scores.shape[-1]) < room) & (values > -jnp.inf)
    picked = jnp.put_along_axis(jnp.zeros(scores.shape, bool), cols, take, axis=-1, inplace=False)
    return forced | picked


def topk_block_mask(scores, k: int, *, force_first: int = 0, force_local: int = 1, valid=None):
    """`budget_block_mask` with the same budget `k` for every row."""
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    return budget_block_mask(scores, k, force_first=force_first, force_local=force_local, valid=valid)


def topk_block_lists(scores, k: int, *, force_first: int = 0, force_local: int = 1, valid=None):
    """`topk_block_mask`'s choice as sorted lists, from one top-k of size k per row (no full sort of
    the row, no [..., rows, nK] mask): (indices int32 [..., rows, min(k, nK)] ascending, padded with
    -1; counts int32 [..., rows]). Needs k >= the forced blocks of every row (force_first +
    force_local covers it): forced blocks rank first and a row keeps at most k."""
    if k < force_first + force_local:
        raise ValueError(f"k={k} must be >= force_first + force_local = {force_first + force_local}")
    valid = _valid(scores.shape, valid)
    forced = forced_block_mask(valid, force_first=force_first, force_local=force_local)
    key = jnp.where(forced, jnp.inf, jnp.where(valid & ~jnp.isnan(scores), scores, -jnp.inf))
    n_k = scores.shape[-1]
    values, cols = jax.lax.top_k(key, min(k, n_k))       # stable: ties to the lower block
    keep = values > -jnp.inf
    cols = jnp.sort(jnp.where(keep, cols, n_k), axis=-1)
    return jnp.where(cols < n_k, cols, -1).astype(jnp.int32), keep.sum(-1, dtype=jnp.int32)


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


def transposed_indices(mask, max_blocks: int | None = None):
    """For each key block, the sorted query blocks that selected it (the dk/dv loop order).

    mask: bool [..., nQ, nK] -> (indices int32 [..., nK, max_blocks or nQ], counts [..., nK]).
    """
    return mask_to_indices(jnp.swapaxes(jnp.asarray(mask, bool), -1, -2), max_blocks)


def tile_weights(seq_q: int, seq_kv: int, block_size: int) -> np.ndarray:
    """float [nQ, nK]: the share of each tile's (query, key) pairs that causality leaves visible
    (1 below the diagonal, about 1/2 on it, partial for ragged edges), end-aligned."""
    n_q, n_k = -(-seq_q // block_size), -(-seq_kv // block_size)
    q = np.arange(n_q * block_size)
    k = np.arange(n_k * block_size)
    visible = (k[None, :] <= q[:, None] + seq_kv - seq_q) & (q[:, None] < seq_q) & (k[None, :] < seq_kv)
    pairs = visible.reshape(n_q, block_size, n_k, block_size).sum(axis=(1, 3))
    return pairs / float(block_size * block_size)


def token_weights(seq_q: int, seq_kv: int, block_size: int) -> np.ndarray:
    """float [T, nK]: the share of each key block that causality leaves visible to each query token
    (end-aligned), the per-token counterpart of `tile_weights`."""
    n_k = -(-seq_kv // block_size)
    position = np.arange(seq_q)[:, None] + seq_kv - seq_q
    start = np.arange(n_k)[None, :] * block_size
    visible = np.clip(np.minimum(position + 1, seq_kv) - start, 0, block_size)
    return visible / float(block_size)


def selection_density(mask, seq_q: int, seq_kv: int, block_size: int, granularity: str = "tile"):
    """Measured density: the share of the causal attention work a selection computes, float32 scalar
    averaged over leading axes. mask [..., rows, nK]: rows are query tiles (granularity "tile") or
    query tokens ("token"). Blocks count by their visible pairs, so a diagonal tile counts half."""
    weights = (tile_weights if granularity == "tile" else token_weights)(seq_q, seq_kv, block_size)
    weights = jnp.asarray(weights, jnp.float32)
    kept = jnp.sum(jnp.asarray(mask, jnp.float32) * weights, axis=(-2, -1))
    return jnp.mean(kept / jnp.sum(weights))


def selection_recall(mask, scores):
    """Share of the dense attention map inside the selected tiles, float32 scalar.

    scores: [B, N, nQ, nK] row-normalised block scores (`block_attention_scores`); mask [B, H, nQ, nK]
    with H = N or a divisor of N (a selection shared by each group of N // H query heads). Rows whose
    scores are all 0 (nothing visible) are left out of the mean.
    """
    group = scores.shape[1] // mask.shape[1]
    mask = jnp.repeat(jnp.asarray(mask, bool), group, axis=1)
    total = scores.sum(-1)
    kept = jnp.where(mask, scores, 0.0).sum(-1)
    rows = total > 0
    return jnp.sum(jnp.where(rows, kept / jnp.where(rows, total, 1.0), 0.0)) / jnp.maximum(rows.sum(), 1)
