"""Sizes and validation shared by the compressed-key block-score kernel and its reference.

Axis letters: B batch, T queries (at positions 0..T-1), N query heads, K kv heads, G = N // K,
D head dim, nW fine windows, nW2 coarse windows, nK = ceil(T / block) key blocks. A window c of
`size` tokens at `stride` covers tokens [c*stride, c*stride + size) and is visible to token t once
it has ended: c*stride + size - 1 <= t, and (with `doc_start`, for packed documents) starts in the
token's document: c*stride >= doc_start[t].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Windows:
    """The static geometry of one call."""

    block: int
    size: int           # fine window
    stride: int
    coarse_size: int
    coarse_stride: int

    @property
    def per_block(self) -> int:       # fine strides per key block (r)
        return self.block // self.stride

    @property
    def per_window(self) -> int:      # fine strides per fine window (u)
        return self.size // self.stride


POOLS = ("max", "overlap")


def overlap_weight(offset, w: Windows):
    """The stride-chunks window c shares with block j, for offset = c - j * per_block (NSA's
    importance mapping with overlapping windows, paper §2.1: l and l' multiples of d); 0 outside
    the overlapping offsets [1 - per_window, per_block - 1]. Works on ints and on arrays."""
    r, u = w.per_block, w.per_window
    shared = jnp.minimum(offset + u, r) - jnp.maximum(offset, 0)
    return jnp.maximum(shared, 0).astype(jnp.float32)


def check(q, fine, coarse, w: Windows, doc_start=None, pool: str = "max") -> None:
    """ValueError naming the argument for inputs the scores are not defined on."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; choose one of {POOLS}")
    if q.ndim != 4 or fine.ndim != 4 or coarse.ndim != 4:
        raise ValueError(f"q, fine and coarse must be [batch, seq, heads, head_dim]; got q{q.shape}, "
                         f"fine{fine.shape}, coarse{coarse.shape}")
    if fine.shape[0] != q.shape[0] or coarse.shape[0] != q.shape[0] or fine.shape[2:] != coarse.shape[2:] \
            or fine.shape[3] != q.shape[3] or q.shape[2] % fine.shape[2]:
        raise ValueError(f"fine{fine.shape} and coarse{coarse.shape} must share batch, kv heads and "
                         f"head_dim with q{q.shape}, whose heads are a multiple of their kv heads")
    if w.size % w.stride or w.block % w.stride or w.coarse_size % w.coarse_stride:
        raise ValueError(f"kernel_stride must divide kernel_size and block_size, coarse_stride must "
                         f"divide coarse_size; got {w}")
    if doc_start is not None and (doc_start.shape != q.shape[:2] or doc_start.dtype != jnp.int32):
        raise ValueError(f"doc_start must be int32 [batch, seq] = {q.shape[:2]}; got {doc_start.dtype}{doc_start.shape}")
    if w.per_window - 1 > w.per_block:
        raise ValueError(f"kernel_size={w.size} may overlap at most one block before its own: "
                         f"need kernel_size <= block_size + kernel_stride")
