"""Shapes, tile classes and index lists shared by the block-sparse kernels and their references.

Axis letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H mask heads (K or N), D head dim, nQ = ceil(T / bs), nK = ceil(S / bs).

Causality is aligned at the end (FlashAttention's convention): query row i sits at absolute
position p = i + (S - T) and sees keys j <= p; a sliding window of w keys also hides keys j <= p - w.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one call, validated once and shared by kernels and references."""

    batch: int
    seq_q: int
    seq_kv: int
    q_heads: int
    kv_heads: int
    mask_heads: int
    head_dim: int
    block: int

    @property
    def group(self) -> int:  # query heads per kv head
        return self.q_heads // self.kv_heads

    @property
    def mask_group(self) -> int:  # query heads per mask head (1 or group)
        return self.q_heads // self.mask_heads

    @property
    def n_q(self) -> int:
        return -(-self.seq_q // self.block)

    @property
    def n_k(self) -> int:
        return -(-self.seq_kv // self.block)

    @property
    def offset(self) -> int:
        return self.seq_kv - self.seq_q


def _check_qk(q, k, block_size: int, block_sizes: tuple[int, ...] = BLOCK_SIZES) -> None:
    if block_size not in block_sizes:
        raise ValueError(f"block_size={block_size} is not supported; choose one of {block_sizes}")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [batch, seq, heads, head_dim]; got q{q.shape}, k{k.shape}")
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype among float32/bfloat16/float16; "
                         f"got q {q.dtype}, k {k.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q{q.shape} and k{k.shape} must agree in batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"num_q_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]}")
    if min(q.shape[1], k.shape[1]) < 1:
        raise ValueError(f"empty sequence: q{q.shape}, k{k.shape}")


def check_qkv(q, k, v, block_size: int, block_sizes: tuple[int, ...] = BLOCK_SIZES) -> None:
    _check_qk(q, k, block_size, block_sizes)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v must match k in shape and dtype; got k{k.shape} {k.dtype}, v{v.shape} {v.dtype}")


def every_tile(q, k, block_size: int):
    """bool [B, K, nQ, nK], all True: the block mask of dense attention (q, k already checked)."""
    (b, t), (s, kh) = q.shape[:2], k.shape[1:3]
    return jnp.ones((b, kh, -(-t // block_size), -(-s // block_size)), bool)


def attention_dims(q, k, v, block_mask, block_size: int,
                   block_sizes: tuple[int, ...] = BLOCK_SIZES) -> Dims:
    """Validates the inputs of `block_sparse_attention` (ValueError with the shapes) and returns Dims."""
    check_qkv(q, k, v, block_size, block_sizes)
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if block_mask.dtype != jnp.bool_:
        raise ValueError(f"block_mask must be bool; got {block_mask.dtype}")
    n_q, n_k = -(-t // block_size), -(-s // block_size)
    if (block_mask.ndim != 4 or block_mask.shape[0] != b or block_mask.shape[1] not in (kh, n)
            or block_mask.shape[2:] != (n_q, n_k)):
        raise ValueError(
            f"block_mask must be [batch={b}, heads={kh} (kv) or {n} (q), {n_q}, {n_k}] for seq={t}, "
            f"seq_kv={s}, block_size={block_size}; got {block_mask.shape}")
    return Dims(b, t, s, n, kh, block_mask.shape[1], d, block_size)


def scores_dims(q, k, block_size: int) -> Dims:
    """Validates the inputs of `block_attention_scores` and returns Dims (one mask head per q head)."""
    _check_qk(q, k, block_size)
    b, t, n, d = q.shape
    return Dims(b, t, k.shape[1], n, k.shape[2], n, d, block_size)


class SegmentIds(NamedTuple):
    """Document ids of packed sequences (splash attention's form): q int [B, T], kv int [B, S].

    A query row sees a key only when their ids are equal (on top of causality and the block
    selection). For self-attention (S == T) a single [B, T] array may be passed instead.
    """

    q: jax.Array
    kv: jax.Array


def segment_ids_pair(segment_ids, dims: Dims) -> SegmentIds | None:
    """Validates `segment_ids` (None, int [B, T] when S == T, or SegmentIds) -> int32 SegmentIds."""
    if segment_ids is None:
        return None
    if not isinstance(segment_ids, SegmentIds):
        if dims.seq_q != dims.seq_kv:
            raise ValueError(f"segment_ids as one array needs seq == seq_kv (got {dims.seq_q}, "
                             f"{dims.seq_kv}); pass SegmentIds(q=[B, T], kv=[B, S])")
        segment_ids = SegmentIds(segment_ids, segment_ids)
    want = {"q": (dims.batch, dims.seq_q), "kv": (dims.batch, dims.seq_kv)}
    for name, ids in zip(SegmentIds._fields, segment_ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer) or tuple(ids.shape) != want[name]:
            raise ValueError(f"segment_ids.{name} must be an integer array of shape {want[name]}; "
                             f"got {ids.dtype} {tuple(ids.shape)}")
    return SegmentIds(*(ids.astype(jnp.int32) for ids in segment_ids))


def segment_element_mask(seg: SegmentIds):
    """bool [B, T, S]: query and key belong to the same document."""
    return seg.q[:, :, None] == seg.kv[:, None, :]


def block_id_range(ids, block: int, n_blocks: int):
    """Per block min and max id, int32 [B, n]; the ragged tail repeats the last id."""
    ids = jnp.pad(ids, ((0, 0), (0, n_blocks * block - ids.shape[1])), mode="edge")
    ids = ids.reshape(ids.shape[0], n_blocks, block)
    return ids.min(-1), ids.max(-1)


def segment_tile_classes(seg: SegmentIds, dims: Dims):
    """bool [B, 1, nQ, nK] pair (possible, uniform) of the document mask.

    possible: some query id of the tile equals some key id (the id ranges overlap); other tiles
    are dropped. uniform: every query and key of the tile has one same id, so the document mask
    is all True there and the tile keeps its causal class (no extra compare).
    """
    q_lo, q_hi = block_id_range(seg.q, dims.block, dims.n_q)
    k_lo, k_hi = block_id_range(seg.kv, dims.block, dims.n_k)
    q_lo, q_hi = q_lo[:, None, :, None], q_hi[:, None, :, None]
    k_lo, k_hi = k_lo[:, None, None, :], k_hi[:, None, None, :]
    possible = (q_lo <= k_hi) & (k_lo <= q_hi)
    uniform = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    return possible, uniform


def reject_bias_and_skip(backend: str, key_bias, skip_threshold, return_skipped) -> None:
    """NotImplementedError naming what a backend without the key bias and BLASST was given."""
    given = [name for name, value in (("key_bias", key_bias), ("skip_threshold", skip_threshold),
                                      ("return_skipped", return_skipped)) if value is not None and value is not False]
    if given:
        raise NotImplementedError(f"{', '.join(given)} is not supported by the {backend} kernel; use "
                                  "impl='pallas' (Triton) or impl='xla'")


def check_key_bias(key_bias, dims: Dims):
    """Validates an additive per-key bias (float [B, K, S], one value per kv head and key) and
    returns it; ValueError naming `key_bias` otherwise."""
    want = (dims.batch, dims.kv_heads, dims.seq_kv)
    if not jnp.issubdtype(key_bias.dtype, jnp.floating) or tuple(key_bias.shape) != want:
        raise ValueError(f"key_bias must be a float array of shape [batch, kv_heads, seq_kv] = {want}; "
                         f"got {key_bias.dtype} {tuple(key_bias.shape)}")
    return key_bias


def skip_log2(skip_threshold) -> float | None:
    """Validates BLASST's lambda (None, or a number in [0, 1); ValueError naming `skip_threshold`
    otherwise) and returns log2(lambda) (-inf for 0: nothing is skipped), or None when off."""
    if skip_threshold is None:
        return None
    if isinstance(skip_threshold, bool) or not isinstance(skip_threshold, (int, float)) \
            or not 0.0 <= skip_threshold < 1.0:
        raise ValueError(f"skip_threshold={skip_threshold!r} is not supported; pass None (off) or a number in "
                         f"[0, 1) (BLASST's lambda)")
    return -math.inf if skip_threshold == 0 else math.log2(skip_threshold)


def default_scale(sm_scale: float | None, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if sm_scale is None else float(sm_scale)


def check_window(window, causal: bool, seq_kv: int) -> int | None:
    """Validates a sliding `window` (None, or an int >= 1 with causal=True; ValueError otherwise)
    and returns it, or None when it hides nothing (window >= S: every key is in every row's
    window), so that such calls run exactly the causal path."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r} is not supported; pass None or an int >= 1 (keys per query)")
    if not causal:
        raise ValueError(f"window={window} needs causal=True (the window ends at the query position)")
    return None if window >= seq_kv else int(window)


def causal_element_mask(seq_q: int, seq_kv: int, causal: bool, window: int | None = None):
    """bool [T, S]: key j is visible to query i (end-aligned causality, and with a window
    p - window < j for the query position p)."""
    p = jnp.arange(seq_q)[:, None] + (seq_kv - seq_q)
    j = jnp.arange(seq_kv)[None, :]
    keep = (j <= p) if causal else jnp.ones((seq_q, seq_kv), bool)
    return keep if window is None else keep & (j > p - window)


def tile_classes(dims: Dims, causal: bool, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Static numpy bool [nQ, nK] pair (possible, full).

    possible: the tile holds at least one visible (real query, real key) pair; other tiles are
    dropped from every list. full: every key of the tile is real and visible to every query row
    of the tile, so the kernels skip the elementwise mask. Causal alone, for a fixed query block
    the full tiles are a prefix of the ascending key blocks, and for a fixed key block the masked
    tiles are a prefix of the ascending query blocks (`block_lists` then needs no reordering).
    A window (from `check_window`) cuts the band's lower edge: tiles below it for every row are
    impossible, tiles crossing it are masked, so the full tiles become a run inside each row.
    """
    bs = dims.block
    q_lo = np.arange(dims.n_q)[:, None] * bs
    q_hi = np.minimum(q_lo + bs, dims.seq_q) - 1
    k_lo = np.arange(dims.n_k)[None, :] * bs
    k_hi = k_lo + bs - 1
    keys_real = k_hi < dims.seq_kv
    if not causal:
        return np.ones((dims.n_q, dims.n_k), bool), np.broadcast_to(keys_real, (dims.n_q, dims.n_k)).copy()
    possible = k_lo <= q_hi + dims.offset
    full = keys_real & (k_hi <= q_lo + dims.offset)
    if window is not None:
        # Row p sees keys > p - window: the tile's last key must be inside the first row's window
        # (then some real pair is visible), its first key inside the last real row's for `full`.
        possible = possible & (k_hi > q_lo + dims.offset - window)
        full = full & (k_lo > q_hi + dims.offset - window)
    return possible, full


def restricted_tiles(block_mask, seg: SegmentIds | None, dims: Dims, causal: bool, window: int | None):
    """The selection without impossible tiles, and the full-tile classes: static numpy for the
    causal (and window) classes alone, [B, 1, nQ, nK] arrays with documents (tiles crossing a
    document boundary are masked, tiles of two different documents dropped)."""
    possible, full = tile_classes(dims, causal, window)
    mask = block_mask & possible
    if seg is not None:
        doc_possible, doc_uniform = segment_tile_classes(seg, dims)
        mask, full = mask & doc_possible, full & doc_uniform
    return mask, full


def mask_to_indices(mask):
    """Sorted column indices of the True entries of each row, padded with -1.

    mask: bool [..., n] -> int32 [..., n]. Built with a cumsum and a scatter, so the cost is
    linear in the size of the mask (no sort), which matters for the transposed dk/dv lists at
    long context.
    """
    n = mask.shape[-1]
    flat = mask.reshape(-1, n)
    cols = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), flat.shape)
    slot = jnp.cumsum(flat, axis=-1, dtype=jnp.int32) - 1
    # Unselected entries go to distinct out-of-range slots, which mode="drop" discards; keeping
    # them distinct makes unique_indices truthful.
    slot = jnp.where(flat, slot, n + cols)
    rows = jnp.arange(flat.shape[0], dtype=jnp.int32)[:, None]
    idx = jnp.full(flat.shape, -1, jnp.int32).at[rows, slot].set(cols, mode="drop", unique_indices=True)
    return idx.reshape(mask.shape)


def block_lists(mask, first):
    """Index lists the kernels loop over: each row's tiles in `first`, then the others.

    mask: bool [B, H, R, C] (already restricted to possible tiles); first: bool broadcastable to
    it, the tiles each row visits first: a static numpy [R, C] (the tile classes) or any array
    (document masks). Each part is ascending.
    Returns idx int32 [B, H, R, C] and counts int32 [B, H, R, 2] = (tiles in `first`, all tiles).
    """
    if isinstance(first, np.ndarray) and not np.any(first[..., 1:] & ~first[..., :-1]):
        # Static classes where `first` is a prefix of every row (causal, no window or documents):
        # the plain ascending list is already in order.
        idx = mask_to_indices(mask)
    else:
        # One list over 2C columns (first tiles, then the rest), folded back to column numbers;
        # at most C entries are real, so the first C slots hold them all.
        first = jnp.broadcast_to(first, mask.shape)
        both = mask_to_indices(jnp.concatenate([mask & first, mask & ~first], axis=-1))
        both = both[..., :mask.shape[-1]]
        idx = jnp.where(both < 0, -1, both % mask.shape[-1])
    n_all = mask.sum(-1, dtype=jnp.int32)
    n_first = (mask & first).sum(-1, dtype=jnp.int32)
    return idx, jnp.stack([n_first, n_all], axis=-1)


def transposed_block_lists(mask, full):
    """`block_lists` of the dk/dv kernels: per key block, the query blocks that selected it, the
    masked tiles first. mask [B, H, R, C]; full as `block_lists` takes `first` (a static numpy
    [R, C] keeps its static fast path)."""
    full_t = full.T if isinstance(full, np.ndarray) else jnp.swapaxes(full, -1, -2)
    return block_lists(jnp.swapaxes(mask, -1, -2), ~full_t)


def normalise_rows(x):
    """x / x.sum(-1): each row of non-negative block scores sums to 1; rows with no mass stay 0."""
    total = x.sum(-1, keepdims=True)
    return jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 0.0)


def pad_axis(x, axis: int, size: int):
    """Zero-pads `axis` of x up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def padded_head_dim(head_dim: int) -> int:
    """Triton tiles need power-of-two sizes and dots need K >= 16: zero columns change no dot product."""
    return max(16, 1 << (head_dim - 1).bit_length())


def token_lists_vjp(fwd_impl, bwd):
    """The differentiable (q, k, v, indices, counts, seg, cfg) -> (o, lse) of a token-level kernel
    (either loop order): `fwd_impl` returns (o, natural lse, internal base-2 lse); `bwd(cfg,
    residuals, (do, dlse))` gets residuals (q, k, v, indices, counts, seg, o, base-2 lse)."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def attention(q, k, v, indices, counts, seg, cfg):
        o, lse, _ = fwd_impl(q, k, v, indices, counts, seg, cfg)
        return o, lse

    def forward(q, k, v, indices, counts, seg, cfg):
        o, lse, lse2 = fwd_impl(q, k, v, indices, counts, seg, cfg)
        return (o, lse), (q, k, v, indices, counts, seg, o, lse2)

    attention.defvjp(forward, bwd)
    return attention
