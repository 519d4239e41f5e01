"""NSA's compression branch: compressed keys and values, and attention over them that also scores
the selection blocks (method notes §2.1, §2.3).

Compressed token i summarises the window of `size` tokens starting at i*stride (complete windows
only: nC = (T - size) // stride + 1, possibly 0). Query t sees compressed token i iff the window
has ended, t >= i*stride + size - 1, and (packed documents) starts inside t's document. Rows that
see none output 0.

`compressed_attention` runs in chunks of queries, each under `jax.checkpoint` and over only the
windows its queries can see, so memory is [chunk, nC] logits per head, never [T, T/stride]: at
T=32k and stride 16 the full map would be 2048 keys per query. The per-chunk softmax probabilities, summed over each GQA group, are what NSA's
selection scores, so a chunk hands them to `importance_to` and only its (small) result is kept.

Axis legend: B batch, T sequence, C chunk of queries, I compressed tokens, K kv heads, G query heads
per kv head, H head dim, F = size * H (a flattened window).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


BANDS = 4   # lax.map passes of the compression branch per layer (see compressed_attention)


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


def visible_windows(rows: jax.Array, n_windows: int, size: int, stride: int,
                    doc_start: jax.Array | None) -> jax.Array:
    """bool [B or 1, C, I]: compressed token i visible to the query at index t (rows [C]) when
    its window has ended by t and, with doc_start [B, C] (each row's document start), begins
    inside the query's document."""
    start = jnp.arange(n_windows) * stride
    seen = (start + size - 1 <= rows[:, None])[None]
    if doc_start is not None:
        seen = seen & (start[None, None, :] >= doc_start[:, :, None])
    return seen


def compressed_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, *, size: int, stride: int,
                         sm_scale: float, chunk: int, doc_start: jax.Array | None = None,
                         importance_to: Callable | None = None):
    """Softmax attention of every query over the compressed tokens it sees.

    q [B, T, N, H] (after RoPE); kc, vc [B, I, K, H] (kc after RoPE at each window's start);
    doc_start [B, T] for packed documents. Returns o [B, T, N, H] in q's dtype (differentiable in
    q, kc, vc), and, with `importance_to`, its results concatenated over the chunks: it is called
    per chunk as importance_to(probs [B, K, C, I_c] f32, the probabilities summed over each kv
    head's G query heads, without gradient, over the chunk's I_c visible windows (a prefix of kc's);
    rows [C], the chunk's query indices; the chunk's doc_start [B, C] or None) and returns arrays
    with C on axis 2 (or a tuple of them).
    """
    b, t, n, h = q.shape
    k_heads = kc.shape[2]
    qg = q.reshape(b, t, k_heads, n // k_heads, h)

    def one_chunk(q_c, kc, vc, first, start_c):
        # q_c [B, C, K, G, H]; kc/vc hold only the windows its band's last query can see.
        rows = first + jnp.arange(q_c.shape[1])
        logits = jnp.einsum("BCKGH,BIKH->BKGCI", q_c, kc, preferred_element_type=jnp.float32) * sm_scale
        seen = visible_windows(rows, kc.shape[1], size, stride, start_c)[:, None, None]   # [B, 1, 1, C, I]
        logits = jnp.where(seen, logits, -jnp.inf)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
        total = e.sum(-1, keepdims=True)
        probs = e / jnp.where(total > 0, total, 1.0)                    # rows seeing nothing: 0
        o = jnp.einsum("BKGCI,BIKH->BCKGH", probs.astype(vc.dtype), vc)
        extra = () if importance_to is None else importance_to(jax.lax.stop_gradient(probs).sum(2), rows, start_c)
        return o.reshape(*o.shape[:2], n, h), extra

    # Chunks go in a few bands, each a lax.map over its chunks against the windows its last query
    # can see: causal work is about half of all, and a band per chunk (exactly half) would unroll
    # T/chunk passes per layer, which takes minutes to compile at 32k.
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    starts = None if doc_start is None else jnp.pad(doc_start, ((0, 0), (0, pad)), mode="edge")
    per_band = -(-n_chunks // BANDS)
    outs, extras = [], []
    for band in range(0, n_chunks, per_band):
        count = min(per_band, n_chunks - band)
        first, last = band * chunk, min((band + count) * chunk, t)
        width = num_windows(last, size, stride)
        q_band = qg[:, first:first + count * chunk].reshape(b, count, chunk, *qg.shape[2:]).swapaxes(0, 1)
        s_band = None if starts is None else starts[:, first:first + count * chunk].reshape(b, count, chunk).swapaxes(0, 1)
        rows0 = first + jnp.arange(count) * chunk
        if width == 0:   # no window has ended yet: every row outputs 0 and scores nothing
            o = jnp.zeros((count, b, chunk, n, h), q.dtype)
            extra = () if importance_to is None else jax.vmap(
                lambda r, st: importance_to(jnp.zeros((b, k_heads, chunk, 0), jnp.float32), r + jnp.arange(chunk), st)
            )(rows0, s_band)
        else:
            kc_b, vc_b = kc[:, :width], vc[:, :width]
            o, extra = jax.lax.map(
                jax.checkpoint(lambda args: one_chunk(args[0], kc_b, vc_b, args[1], args[2])), (q_band, rows0, s_band))
        outs.append(o)
        extras.append(extra)
    # [count, B, C, ...] per band -> [B, T, ...]
    merge = lambda parts, axis: jnp.concatenate([jnp.moveaxis(p_, 0, axis).reshape(
        *p_.shape[1:axis + 1], -1, *p_.shape[axis + 2:]) for p_ in parts], axis=axis)
    o = merge(outs, 1)[:, :t]
    if importance_to is None:
        return o
    return o, jax.tree.map(lambda *parts: merge(parts, 2)[:, :, :t], *extras)


def overlap_weights(size: int, stride: int, block_size: int) -> dict[int, int]:
    """{offset o: weight}: block j's score is the sum over o of weight * p[j * block_size/stride + o],
    the number of stride-long segments compressed token j*r + o shares with block j (r =
    block_size/stride). This is the paper's mapping with overlapping windows (§2.1, d | l, d | l')."""
    segs, r = size // stride, block_size // stride
    return {o: min(o + segs, r) - max(o, 0) for o in range(1 - segs, r)}


def block_importance(probs: jax.Array, size: int, stride: int, block_size: int, n_blocks: int) -> jax.Array:
    """[..., I] compressed-token probabilities -> [..., n_blocks] selection-block scores."""
    segs, r = size // stride, block_size // stride
    n_win = probs.shape[-1]
    left, right = segs - 1, max(0, n_blocks * r - n_win)
    padded = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(left, right)])
    total = 0.0
    for offset, weight in overlap_weights(size, stride, block_size).items():
        begin = offset + left
        total = total + weight * padded[..., begin:begin + n_blocks * r:r]
    return total
