"""SeerAttention's block ground truth on Pallas Mosaic TPU (same semantics as the reference).

GT[i, j] = max over the (query block i, key block j) tile of the dense (causal) softmax map P,
each row normalised over j. P is never materialised; two passes over the possible tiles, both on
the forward's grid (B, N, nQ, nK) and scalar-prefetched slot lists (kernel.py's docstring):

  pass 1 (lse)   online softmax without V: the natural row LSE, stored as [B, N, 1, T_p] rows.
  pass 2 (pool)  per tile exp(max_{r,c} (s[r, c] - lse[r])), written into lane j of the row's
                 (1, nK) output block, which stays in VMEM for the whole row.

The lists are the causal pattern (every possible tile), the same for every head; with segment ids
the tiles between documents are dropped from each batch row's lists, and every other tile
compares row and column ids (kernel.py's layout), so the map is each document's own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse_tpu.kernel import (LANES, _branches, _call, _Config, _doc_refs, _docs, _dot,
                                                    _heads, _is_full, _lanes, _masked, _restricted,
                                                    _row_grid_specs, _visible, check_block_size, interpret_params,
                                                    padded_head_dim, slot_lists)

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _logits(q_ref, k_ref, qi, kb, masked, docs, cfg: _Config):
    bs = cfg.dims.block
    q = q_ref[...]
    s = _dot(q, k_ref[...], (((1,), (1,)), ((), ())), q.dtype) * cfg.scale
    if masked:
        q_pos = qi * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
        k_pos = kb * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
        s = _masked(s, _visible(q_pos, k_pos, cfg), docs, bs)
    return s


def _slot(cfg: _Config):
    d = cfg.dims
    b, h, qi, t = (pl.program_id(a) for a in range(4))
    del h  # the lists are shared by all heads (mask_heads = 1)
    row = b * d.n_q + qi
    return qi, t, row, row * d.n_k + t


def _lse_kernel(data_ref, cnt_ref, q_ref, k_ref, *refs, cfg: _Config):
    docs, (lse_ref, m_sc, l_sc) = _doc_refs(refs, cfg)
    qi, t, row, slot = _slot(cfg)
    kb = data_ref[slot]

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    def body(masked):
        s = _logits(q_ref, k_ref, qi, kb, masked, docs, cfg)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp(s - _lanes(m_sub, cfg.dims.block))
        l_sc[...] = jnp.exp(m_prev - m_sub) * l_sc[...] + p.sum(axis=1, keepdims=True)
        m_sc[...] = m_new

    _branches(t < cnt_ref[row], _is_full(qi, kb, cfg), body)

    @pl.when(t == cfg.dims.n_k - 1)
    def _finish():
        l = l_sc[...]
        lse = jnp.where(l == 0.0, jnp.inf, m_sc[...] + jnp.log(jnp.where(l == 0.0, 1.0, l)))
        lse_ref[...] = lse.T[:1, :]


def _pool_kernel(data_ref, cnt_ref, q_ref, k_ref, lse_ref, *refs, cfg: _Config):
    docs, (out_ref,) = _doc_refs(refs, cfg)
    qi, t, row, slot = _slot(cfg)
    kb = data_ref[slot]

    @pl.when(t == 0)
    def _init():
        out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)  # impossible tiles stay 0

    def body(masked):
        # log of P; rows with lse = +inf (none visible, or padding) give -inf.
        s = _logits(q_ref, k_ref, qi, kb, masked, docs, cfg) - lse_ref[0][:, None]
        top = jnp.exp(s.max(axis=1, keepdims=True).max(axis=0, keepdims=True))  # (1, 1)
        lane = lax.broadcasted_iota(jnp.int32, out_ref.shape, 1)
        out_ref[...] = jnp.where(lane == kb, top, out_ref[...])

    _branches(t < cnt_ref[row], _is_full(qi, kb, cfg), body)


def block_attention_scores(q, k, *, block_size=64, causal=True, sm_scale=None, segment_ids=None,
                           interpret=False):
    """Block ground truth of the dense softmax map: f32 [B, N, nQ, nK] (Pallas Mosaic TPU).

    Args:
      q: [B, T, N, D]; k: [B, S, K, D] (GQA: query head h reads kv head h // (N // K)).
      block_size: bs, one of 128, 256, 512 on TPU (the tile of the max-pool).
      causal: end-aligned causal map; tiles with no visible pair are 0.
      sm_scale: logit scale, default 1/sqrt(D).
      segment_ids: None, int [B, T] (S == T) or `common.SegmentIds`: the map of each document alone.
      interpret: True runs the TPU interpreter on CPU; an InterpretParams instance is used as given.
    Returns, per (query block i, key block j), max_{rows of i, keys of j} softmax probability,
    normalised so each row sums to 1 over j (rows with no visible key are all 0).
    """
    check_block_size(block_size)
    d = dataclasses.replace(common.scores_dims(q, k, 128), mask_heads=1, block=block_size)
    seg = common.segment_ids_pair(segment_ids, d)
    cfg = _Config(d, bool(causal), common.default_scale(sm_scale, d.head_dim), interpret_params(interpret),
                  segmented=seg is not None)
    bs, dh = d.block, padded_head_dim(d.head_dim)
    t_p = d.n_q * bs
    qp, kp = _heads(q, t_p, dh), _heads(k, d.n_k * bs, dh)
    # Every tile that holds a visible pair (causally, and within a document).
    lists = slot_lists(_restricted(jnp.ones((d.batch, 1, d.n_q, d.n_k), bool), seg, cfg))
    docs = _docs(seg, cfg).forward   # (query-row ids, key-column ids), empty without segment ids
    q_tile, kv_tile, row_vec, doc_specs = _row_grid_specs(cfg, dh)
    grid = (d.batch, d.q_heads, d.n_q, d.n_k)

    lse = _call(_lse_kernel, cfg, grid=grid, in_specs=[q_tile, kv_tile, *doc_specs], out_specs=row_vec,
                out_shape=jax.ShapeDtypeStruct((d.batch, d.q_heads, 1, t_p), jnp.float32),
                scratch=[pltpu.VMEM((bs, LANES), jnp.float32)] * 2, semantics=_SEMANTICS,
                name="block_scores_tpu_lse")(*lists, qp, kp, *docs)
    # Padded query rows must not enter the max: +inf LSE makes their probabilities 0.
    lse = jnp.where(jnp.arange(t_p) < d.seq_q, lse, jnp.inf)

    # One (1, nK) output row per (b, h, query block): a trailing unit axis keeps the block's last
    # two dimensions equal to the array's, as Mosaic requires.
    out_spec = pl.BlockSpec((None, None, None, 1, d.n_k), lambda b, h, i, t, *_: (b, h, i, 0, 0))
    raw = _call(_pool_kernel, cfg, grid=grid, in_specs=[q_tile, kv_tile, row_vec, *doc_specs],
                out_specs=out_spec,
                out_shape=jax.ShapeDtypeStruct((d.batch, d.q_heads, d.n_q, 1, d.n_k), jnp.float32),
                scratch=[], semantics=_SEMANTICS, name="block_scores_tpu_pool")(*lists, qp, kp, lse, *docs)
    raw = raw[:, :, :, 0, :]
    total = raw.sum(-1, keepdims=True)
    return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), 0.0)

