"""Pure-jnp references of the block-sparse kernels, with identical signatures.

They materialise the [T, S] logits in float32 (products at HIGHEST precision), so they are the
ground truth for tests and the "xla" implementation on CPU; they are not meant for long contexts.
`interpret` is accepted and ignored so that kernel and reference are interchangeable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import LOG2E
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


def _blasst_skipped(s, block_mask, seg, d: common.Dims, causal: bool, window, skip_log: float):
    """bool [B, N, nQ, nK]: the tiles the kernel's BLASST forward skips, by replaying its loop.

    s: f32 [B, K, G, T, S] scaled logits, -inf where hidden; block_mask bool [B, H, nQ, nK]. Each
    query tile visits its tiles in the kernel's list order (`common.block_lists`: full tiles, then
    masked ones, each ascending) with a running maximum per row; a tile is skipped when every real
    row's tile maximum is below its running maximum + ln(lambda), and then leaves the maximum as it
    was.
    """
    bs, n_q, n_k = d.block, d.n_q, d.n_k
    mask, full = common.restricted_tiles(block_mask, seg, d, causal, window)
    idx, cnt = common.block_lists(mask, full)                          # [B, H, nQ, nK], [B, H, nQ, 2]
    idx, cnt = (jnp.repeat(x, d.mask_group, axis=1) for x in (idx, cnt))   # per query head
    s = s.reshape(d.batch, d.q_heads, d.seq_q, d.seq_kv)
    s = jnp.pad(s, ((0, 0), (0, 0), (0, n_q * bs - d.seq_q), (0, n_k * bs - d.seq_kv)), constant_values=-jnp.inf)
    tile_max = s.reshape(d.batch, d.q_heads, n_q, bs, n_k, bs).max(-1)   # [B, N, nQ, bs rows, nK]
    padded_row = (jnp.arange(n_q * bs) >= d.seq_q).reshape(n_q, bs)

    def step(m, t):
        kb = jnp.maximum(idx[..., t], 0)
        rows = jnp.take_along_axis(tile_max, kb[..., None, None], axis=-1)[..., 0]   # [B, N, nQ, bs]
        skip = (t < cnt[..., 1]) & jnp.all((rows < m + skip_log) | padded_row, axis=-1)
        used = (t < cnt[..., 1]) & ~skip
        return jnp.where(used[..., None], jnp.maximum(m, rows), m), (kb, skip)

    m0 = jnp.full((d.batch, d.q_heads, n_q, bs), -jnp.inf)
    _, (kbs, skips) = jax.lax.scan(step, m0, jnp.arange(n_k))
    kbs, skips = jnp.moveaxis(kbs, 0, -1), jnp.moveaxis(skips, 0, -1)   # [B, N, nQ, nK] by list slot
    return jnp.any((kbs[..., :, None] == jnp.arange(n_k)) & skips[..., :, None], axis=-2)


def block_sparse_attention(q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None,
                           segment_ids=None, window=None, key_bias=None, skip_threshold=None, interpret=False,
                           return_lse=False, return_skipped=False):
    """Reference of `kernel.block_sparse_attention` (same arguments, shapes and semantics)."""
    del interpret
    skip_log = common.skip_log2(skip_threshold)
    if skip_log is not None and isinstance(block_mask, Selection) and block_mask.granularity == "token":
        raise NotImplementedError("skip_threshold with a token-level Selection is not supported yet")
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
    skipped = jnp.zeros((d.batch, d.q_heads, d.n_q, d.n_k), bool)
    if skip_log is not None:
        tiles = block_mask.to_mask() if isinstance(block_mask, Selection) else block_mask
        skipped = _blasst_skipped(jnp.where(elem, s, -jnp.inf), tiles, seg, d, causal, window, skip_log / LOG2E)
        kept = jnp.repeat(jnp.repeat(~skipped, d.block, axis=2), d.block, axis=3)[:, :, :d.seq_q, :d.seq_kv]
        elem = elem & kept.reshape(d.batch, d.kv_heads, d.group, d.seq_q, d.seq_kv)
    p, lse = _masked_softmax(s, elem)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=_HI)
    o = o.reshape(q.shape).astype(q.dtype)
    lse = lse.reshape(d.batch, d.q_heads, d.seq_q)
    outs = (o, *((lse,) if return_lse else ()), *((skipped,) if return_skipped else ()))
    return outs if len(outs) > 1 else o


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
