"""Pure-jnp references of the block-sparse kernels, with identical signatures.

They materialise the [T, S] logits in float32 (products at HIGHEST precision), so they are the
ground truth for tests and the "xla" implementation on CPU; they are not meant for long contexts.
`interpret` is accepted and ignored so that kernel and reference are interchangeable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.selection import Selection, token_attention_dims

_HI = jax.lax.Precision.HIGHEST


def _logits(q, k, dims: common.Dims, scale: float):
    """f32 [B, K, G, T, S] scaled logits; query head h = kv head h // G, member h % G."""
    qg = q.reshape(dims.batch, dims.seq_q, dims.kv_heads, dims.group, dims.head_dim)
    return jnp.einsum("btkgd,bskd->bkgts", qg.astype(jnp.float32), k.astype(jnp.float32),
                      precision=_HI) * scale


def _masked_softmax(s, allowed):
    """exp(s - lse) restricted to `allowed`, and the natural LSE; empty rows give p = 0, lse = -inf.

    The where-guards keep gradients finite for empty rows (no 0 * inf anywhere).
    """
    s = jnp.where(allowed, s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    l = e.sum(-1, keepdims=True)
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    lse = jnp.where(nonempty, jnp.log(l_safe) + m, -jnp.inf)
    return e / l_safe, lse[..., 0]


def _visible(dims: common.Dims, causal: bool, seg, window: int | None = None):
    """bool [B or 1, 1, 1, T, S]: causality, the sliding window and (with segment ids) same document."""
    allowed = common.causal_element_mask(dims.seq_q, dims.seq_kv, causal, window)[None]
    if seg is not None:
        allowed = allowed & common.segment_element_mask(seg)
    return allowed[:, None, None]


def _selected_keys(q, k, v, block_mask, block_size: int):
    """(Dims, bool [B, H, T, S]): the keys inside each query row's selected blocks, for a tile
    mask, a tile `Selection` or a token `Selection`."""
    if isinstance(block_mask, Selection) and block_mask.granularity == "token":
        d = token_attention_dims(q, k, v, block_mask, block_size)
        elem = jnp.repeat(block_mask.to_mask(), block_size, axis=3)
    else:
        if isinstance(block_mask, Selection):
            block_mask = block_mask.to_mask()
        d = common.attention_dims(q, k, v, block_mask, block_size)
        elem = jnp.repeat(jnp.repeat(block_mask, block_size, axis=2), block_size, axis=3)
    return d, elem[:, :, :d.seq_q, :d.seq_kv]


def block_sparse_attention(q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None,
                           segment_ids=None, window=None, key_bias=None, interpret=False, return_lse=False):
    """Reference of `kernel.block_sparse_attention` (same arguments, shapes and semantics)."""
    del interpret
    d, elem = _selected_keys(q, k, v, block_mask, block_size)
    window = common.check_window(window, causal, d.seq_kv)
    seg = common.segment_ids_pair(segment_ids, d)
    scale = common.default_scale(sm_scale, d.head_dim)
    # Element mask [B, K, 1 or G, T, S].
    elem = elem.reshape(d.batch, d.kv_heads, d.mask_heads // d.kv_heads, d.seq_q, d.seq_kv)
    elem = elem & _visible(d, causal, seg, window)
    s = _logits(q, k, d, scale)
    if key_bias is not None:   # [B, K, S] -> every group member and query row of kv head k
        s = s + common.check_key_bias(key_bias, d).astype(jnp.float32)[:, :, None, None, :]
    p, lse = _masked_softmax(s, elem)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=_HI)
    o = o.reshape(q.shape).astype(q.dtype)
    lse = lse.reshape(d.batch, d.q_heads, d.seq_q)
    return (o, lse) if return_lse else o


def block_attention_scores(q, k, *, block_size=64, causal=True, sm_scale=None, segment_ids=None,
                           interpret=False):
    """Reference of `scores.block_attention_scores`: f32 [B, N, nQ, nK].

    The 2-D max-pool of the dense (causal, same-document) softmax map over each (query block, key
    block) tile, row-normalised over key blocks; tiles with no visible pair, and rows with none at
    all, are 0.
    """
    del interpret
    d = common.scores_dims(q, k, block_size)
    seg = common.segment_ids_pair(segment_ids, d)
    scale = common.default_scale(sm_scale, d.head_dim)
    p, _ = _masked_softmax(_logits(q, k, d, scale), _visible(d, causal, seg))
    p = p.reshape(d.batch, d.q_heads, d.seq_q, d.seq_kv)
    # Probabilities are >= 0, so zero padding never wins the max.
    p = common.pad_axis(common.pad_axis(p, 2, d.n_q * block_size), 3, d.n_k * block_size)
    pooled = p.reshape(d.batch, d.q_heads, d.n_q, block_size, d.n_k, block_size).max(axis=(3, 5))
    return common.normalise_rows(pooled)


def attention_with_block_scores(q, k, v, *, block_size=64, causal=True, sm_scale=None, segment_ids=None,
                                interpret=False):
    """Reference of `kernel.attention_with_block_scores`: (dense attention over every key, the block
    ground truth of its map)."""
    common.check_qkv(q, k, v, block_size)
    every_tile = common.every_tile(q, k, block_size)
    kw = dict(block_size=block_size, causal=causal, sm_scale=sm_scale, segment_ids=segment_ids)
    o = block_sparse_attention(q, k, v, every_tile, **kw)
    return o, jax.lax.stop_gradient(block_attention_scores(q, k, **kw))
