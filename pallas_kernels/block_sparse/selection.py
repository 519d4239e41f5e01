"""`Selection`: sorted lists of selected key blocks, per query tile or per query token.

The currency between routing and the kernels. Two granularities, told apart by `granularity`:

  "tile"   indices [B, H, nQ, m]: one list per query block of bs tokens (SeerAttention, MoBA's
           tile form, our tile kernel). H = K (shared by a GQA group) or N (per query head).
  "token"  indices [B, H, T, m]: one list per query token (NSA, InfLLM-V2, MoBA). H = K (one
           choice per GQA group, NSA/InfLLM-V2) or N.

Lists are ascending; only the first `counts` entries of a row are read (the rest is padding,
-1 by convention). Block j covers keys [j*bs, (j+1)*bs); under causality a token still sees only
the keys at or before its position inside its selected blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import mask_to_indices

GRANULARITIES = ("tile", "token")


def mask_to_lists(mask, max_blocks: int | None = None):
    """Sorted lists of the selected key blocks of each row, in the NSA/FSA layout.

    mask: bool [..., rows, nK] -> (indices int32 [..., rows, max_blocks or nK], ascending, padded
    with -1; counts int32 [..., rows]). With max_blocks, rows holding more keep their lowest
    max_blocks indices (and count). Cost is linear in the mask (a cumsum and a scatter).
    """
    mask = jnp.asarray(mask, bool)
    idx = mask_to_indices(mask)
    counts = mask.sum(-1, dtype=jnp.int32)
    if max_blocks is not None:
        idx, counts = idx[..., :max_blocks], jnp.minimum(counts, max_blocks)
    return idx, counts


def indices_to_mask(indices, num_blocks: int, counts=None):
    """Inverse of `mask_to_lists`: int [..., rows, m] -> bool [..., rows, nK]. Entries < 0, and
    with `counts` the entries past each row's count, are ignored."""
    indices = jnp.asarray(indices)
    ignored = indices < 0
    if counts is not None:
        ignored = ignored | (jnp.arange(indices.shape[-1]) >= jnp.asarray(counts)[..., None])
    cols = jnp.where(ignored, num_blocks, indices)  # out of range: dropped
    return jnp.put_along_axis(jnp.zeros((*indices.shape[:-1], num_blocks), bool), cols, True,
                              axis=-1, inplace=False, mode="drop")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["indices", "counts", "extras"],
                   meta_fields=["num_blocks", "granularity"])
@dataclasses.dataclass(frozen=True)
class Selection:
    """Which key blocks each row attends to.

    indices: int32 [B, H, rows, m], each row's selected key blocks ascending (padding -1);
    counts: int32 [B, H, rows], how many entries of each row are real; num_blocks: nK (static);
    granularity: "tile" (rows = nQ query blocks) or "token" (rows = T query tokens).
    extras: arrays a method keeps beside the choice (gate logits, scores) for its losses/metrics.
    """

    indices: jax.Array
    counts: jax.Array
    num_blocks: int
    extras: dict = dataclasses.field(default_factory=dict)
    granularity: str = "tile"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}; choose one of {GRANULARITIES}")

    @classmethod
    def from_mask(cls, mask, max_blocks: int | None = None, *, granularity: str = "tile",
                  **extras) -> "Selection":
        """From a bool block mask [B, H, rows, nK] (rows = nQ tiles or T tokens)."""
        indices, counts = mask_to_lists(mask, max_blocks)
        return cls(indices, counts, mask.shape[-1], dict(extras), granularity)

    def to_mask(self) -> jax.Array:
        """bool [B, H, rows, nK]; entries past each row's count are ignored."""
        return indices_to_mask(self.indices, self.num_blocks, self.counts)


def _concrete(x) -> np.ndarray | None:
    """x as numpy when its values are known now (not traced under jit), else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_lists(sel: Selection, shape: tuple[int, ...], num_blocks: int) -> None:
    """ValueError naming the field unless `sel` holds valid lists of rows `shape` = (B, H, rows).

    Shapes and dtypes are always checked; values (range, order, counts) only when concrete,
    since a jitted caller's lists are traced.
    """
    if sel.num_blocks != num_blocks:
        raise ValueError(f"selection.num_blocks={sel.num_blocks}, but the keys hold {num_blocks} blocks")
    width = sel.indices.shape[-1] if sel.indices.ndim else 0
    for name, arr, want in (("indices", sel.indices, (*shape, width)), ("counts", sel.counts, shape)):
        if arr.dtype != jnp.int32:
            raise ValueError(f"selection.{name} must be int32; got {arr.dtype}")
        if tuple(arr.shape) != tuple(want):
            raise ValueError(f"selection.{name} must have shape {tuple(want)} ([B, H, rows"
                             f"{', max_blocks' if name == 'indices' else ''}]); got {tuple(arr.shape)}")
    idx, counts = _concrete(sel.indices), _concrete(sel.counts)
    if idx is None or counts is None:
        return
    m = idx.shape[-1]
    if ((counts < 0) | (counts > m)).any():
        raise ValueError(f"selection.counts must lie in [0, max_blocks={m}]")
    real = np.arange(m) < counts[..., None]
    if (real & ((idx < 0) | (idx >= num_blocks))).any():
        raise ValueError(f"selection.indices must lie in [0, num_blocks={num_blocks}) within counts")
    if (real[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any():
        raise ValueError("selection.indices must be strictly ascending within each row's count")


def token_attention_dims(q, k, v, selection: Selection, block_size: int,
                         block_sizes: tuple[int, ...] = common.BLOCK_SIZES) -> common.Dims:
    """`common.attention_dims` for a token-level selection ([B, H, T, m] lists, H = K or N)."""
    common.check_qkv(q, k, v, block_size, block_sizes)
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    heads = selection.indices.shape[1] if selection.indices.ndim == 4 else -1
    if heads not in (kh, n):
        raise ValueError(f"selection.indices must be [batch={b}, heads={kh} (kv) or {n} (q), seq={t}, "
                         f"max_blocks]; got {tuple(selection.indices.shape)}")
    check_lists(selection, (b, heads, t), -(-s // block_size))
    return common.Dims(b, t, s, n, kh, heads, d, block_size)


def clean_lists(sel: Selection, seg, dims: common.Dims, causal: bool, window: int | None):
    """int32 [B, H, T, m]: each token's usable blocks (others -1; not compacted). Entries past
    `counts`, blocks after the token (causal), blocks ending before its window and blocks holding
    none of its document (seg: `common.SegmentIds` or None) are dropped, so that the token kernels
    of either loop order do useful work at every step."""
    idx, m = sel.indices, sel.indices.shape[-1]
    ok = (jnp.arange(m) < sel.counts[..., None]) & (idx >= 0) & (idx < dims.n_k)
    pos = (jnp.arange(dims.seq_q) + dims.offset)[:, None]
    if causal:
        ok = ok & (idx * dims.block <= pos)
    if window is not None:  # the block's last key must lie inside the token's window
        ok = ok & ((idx + 1) * dims.block - 1 > pos - window)
    if seg is not None:  # the block's id range must hold the token's id
        k_lo, k_hi = common.block_id_range(seg.kv, dims.block, dims.n_k)
        safe = jnp.clip(idx, 0, dims.n_k - 1)
        take = lambda r: jnp.take_along_axis(r[:, None, None, :], safe, axis=-1, mode="clip")  # noqa: E731
        qid = seg.q[:, None, :, None]
        ok = ok & (take(k_lo) <= qid) & (qid <= take(k_hi))
    return jnp.where(ok, idx, -1)
