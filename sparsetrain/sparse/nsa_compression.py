"""NSA's compression branch: compressed keys and values, and attention over them that also scores
the selection blocks (method notes §2.1, §2.3).

Compressed token i summarises the window of `size` tokens starting at i*stride (complete windows
only: nC = (T - size) // stride + 1, possibly 0). Query t sees compressed token i iff the window
has ended, t >= i*stride + size - 1, and (packed documents) starts inside t's document. Rows that
see none output 0.

`compressed_attention` runs on the block-sparse flash kernel (see its docstring): no [T, T/stride]
map is materialised (at T=32k and stride 16 that would be 2048 keys per query and head). The
selection's block importance, the same softmax probabilities summed over each GQA group and pooled
onto blocks, comes from `ops.token_block_scores(..., pool="overlap")`, a flash-style kernel that
writes only [T, nK] per kv head.

Axis legend: B batch, T sequence, C chunk of queries, I compressed tokens, K kv heads, G query heads
per kv head, H head dim, F = size * H (a flattened window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsetrain import ops
from sparsetrain.attention.sharded import block_sparse_attention

TILE = 64   # query and key tile of the compressed attention's kernel calls


def num_windows(seq_len: int, size: int, stride: int) -> int:
    return max(0, (seq_len - size) // stride + 1)


def windows(x: jax.Array, size: int, stride: int) -> jax.Array:
    """[B, T, K, H] -> [B, I, size, K, H]: the tokens of each complete window."""
    n = num_windows(x.shape[1], size, stride)
    index = jnp.arange(n)[:, None] * stride + jnp.arange(size)[None, :]
    return x[:, index]


def compress(x: jax.Array, kind: str, size: int, stride: int, weights: dict[str, jax.Array]) -> jax.Array:
    """phi over every complete window: [B, T, K, H] -> [B, I, K, H] in x's dtype.

    kind "mean": the window's mean (fla-org's simplified NSA). "linear": per kv head, one matrix
    w [K, F, H] on the flattened window (the full reference's convolution). "mlp": per kv head,
    w1 [K, F, M], SiLU, w2 [K, M, H] (the paper's "learnable MLP"). For "linear" and "mlp", an
    intra-block position embedding `position` [K, size, H], when given (keys; the reference gives
    values none), is added to each window's tokens first.
    """
    win = windows(x, size, stride)
    if kind == "mean":
        return win.astype(jnp.float32).mean(2).astype(x.dtype)
    dt = x.dtype
    if "position" in weights:
        win = win + weights["position"].swapaxes(0, 1).astype(dt)        # [size, K, H] per window
    b, i, _, k, h = win.shape
    flat = win.transpose(0, 1, 3, 2, 4).reshape(b, i, k, size * h)       # [B, I, K, F]
    if kind == "linear":
        return jnp.einsum("BIKF,KFH->BIKH", flat, weights["w"].astype(dt))
    hidden = jax.nn.silu(jnp.einsum("BIKF,KFM->BIKM", flat, weights["w1"].astype(dt)))
    return jnp.einsum("BIKM,KMH->BIKH", hidden, weights["w2"].astype(dt))


def compressor_shapes(kind: str, size: int, head_dim: int, kv_heads: int, hidden: int,
                      position: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of `compress`'s weights for one of keys or values."""
    flat = size * head_dim
    shapes = {"mean": {}, "linear": {"w": (kv_heads, flat, head_dim)},
              "mlp": {"w1": (kv_heads, flat, hidden), "w2": (kv_heads, hidden, head_dim)}}[kind]
    if position and kind != "mean":
        shapes = dict(shapes, position=(kv_heads, size, head_dim))
    return shapes


def compressed_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, *, size: int, stride: int, sm_scale: float,
                         segment_ids: jax.Array | None = None, impl: str = "auto"):
    """Softmax attention of every query over the compressed tokens it sees: (o [B, T, N, H] in q's
    dtype, differentiable in q, kc and vc; natural LSE f32 [B, N, T], -inf for rows that see none).

    q [B, T, N, H] (after RoPE); kc, vc [B, I, K, H] (kc after RoPE at each window's start);
    segment_ids [B, T] for packed documents. Query t sees compressed token i iff its window has
    ended, i*stride + size - 1 <= t, and (documents) starts in t's document. Rows that see none
    output 0.

    The block-sparse flash kernel at full density runs it, with no [T, I] map anywhere: query t =
    a*stride + r sees i <= a - size/stride + (1 if r == stride - 1 else 0), so the queries of each
    residue r are plain end-aligned causal attention over a prefix of the compressed keys. The
    stride - 1 residues that share a prefix go as one batch (K/V repeated: I * stride rows, the
    size of the uncompressed keys), the last residue as a second call.
    """
    b, t, n, h = q.shape
    segs = size // stride
    rows = -(-t // stride)                                     # a = 0 .. rows - 1
    by_residue = lambda x: jnp.swapaxes(  # noqa: E731  [B, T, ...] -> [B, stride, A, ...]
        jnp.pad(x, [(0, 0), (0, rows * stride - t)] + [(0, 0)] * (x.ndim - 2),
                mode="edge").reshape(b, rows, stride, *x.shape[2:]), 1, 2)
    qr = by_residue(q)
    seg = None if segment_ids is None else by_residue(segment_ids)

    def attend(residues: slice, n_keys: int):
        """Queries of the residues in `residues` [B, R, A, N, H]; they see compressed token i iff
        i <= a - (rows - n_keys)."""
        q_part = qr[:, residues]
        r = q_part.shape[1]
        if n_keys <= 0:
            return jnp.zeros(q_part.shape, q.dtype), jnp.full((b, r, n, rows), -jnp.inf, jnp.float32)
        keys, values = (jnp.repeat(jnp.pad(x[:, :n_keys], ((0, 0), (0, max(0, n_keys - x.shape[1])), (0, 0), (0, 0))),
                                   r, axis=0) for x in (kc, vc))
        ids = None
        if seg is not None:
            # A compressed token belongs to the document of its window's first token (windows past
            # the end, which no real query sees, take the last id).
            starts = jnp.minimum(jnp.arange(n_keys) * stride, t - 1)
            ids = ops.SegmentIds(seg[:, residues].reshape(b * r, rows), jnp.repeat(segment_ids[:, starts], r, axis=0))
        tiles = jnp.broadcast_to(ops.causal_block_mask(rows, n_keys, TILE), (b * r, kc.shape[2], -(-rows // TILE),
                                                                            -(-n_keys // TILE)))
        o, lse = block_sparse_attention(
            q_part.reshape(b * r, rows, n, h), keys, values, tiles,
            block_size=TILE, sm_scale=sm_scale, segment_ids=ids, impl=impl, return_lse=True,
            split_sequence=False)   # rows of compressed tokens: whole on every context device
        return o.reshape(q_part.shape), lse.reshape(b, r, n, rows)

    parts = [attend(slice(stride - 1, stride), rows - segs + 1)]
    if stride > 1:
        parts.insert(0, attend(slice(0, stride - 1), rows - segs))
    o = jnp.swapaxes(jnp.concatenate([o for o, _ in parts], axis=1), 1, 2).reshape(b, rows * stride, n, h)[:, :t]
    lse = jnp.concatenate([lse for _, lse in parts], axis=1)   # [B, stride, N, A]
    return o, lse.transpose(0, 2, 3, 1).reshape(b, n, rows * stride)[:, :, :t]
