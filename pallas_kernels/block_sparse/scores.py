"""SeerAttention's block ground truth, flash style (Pallas Triton lowering).

GT[i, j] = max over the (query block i, key block j) tile of the dense softmax map P, then each
row normalised over j. P is never materialised; two passes over the causal tiles:

  pass 1 (lse kernel)   row LSE of the scaled logits, in base 2: the online softmax without V.
  pass 2 (pool kernel)  max_{r,c in tile} P[r, c] = exp2(max_{r,c} (s[r, c] - lse[r])): a dot, a
                        subtraction and a max per tile, and a single exp2 per tile.

Each pass costs one Q.K^T over the causal tiles, so together they do the matrix products of one
dense causal forward (without the P.V half of its work). Grid (nQ, B, N) as in the attention
forward. Without segment ids the dense causal tile lists are static and shared by every (batch,
head); with them, each batch row gets its own lists (tiles between two documents dropped, tiles
crossing a boundary masked by an id compare).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import Dims
from pallas_kernels.block_sparse.kernel import (current_tuning, dot_precision, logits_tile, pallas,
                                                query_block, run_two_loops)


def _tile_fn(q_ref, k_ref, qseg_ref, kseg_ref, *, dims: Dims, causal, scale, precision, segmented):
    """`logits_tile` of this program's query block, with its document ids when segmented."""
    qi = query_block(pl.program_id(0), dims.n_q, causal)
    docs = (qseg_ref[...], kseg_ref) if segmented else None
    return functools.partial(logits_tile, q_ref[...], k_ref, rows=qi * dims.block + jnp.arange(dims.block),
                             dims=dims, causal=causal, scale=scale, precision=precision, docs=docs)


def _lse_kernel(idx_ref, cnt_ref, qseg_ref, kseg_ref, q_ref, k_ref, lse_ref, **kw):
    bs = kw["dims"].block
    tile = _tile_fn(q_ref, k_ref, qseg_ref, kseg_ref, **kw)

    def step(t, carry, *, masked):
        m, l = carry
        s = tile(pl.multiple_of(idx_ref[t] * bs, bs), masked=masked)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        return m_new, l * jnp.exp2(m - m_sub) + jnp.exp2(s - m_sub[:, None]).sum(axis=1)

    init = (jnp.full((bs,), -jnp.inf, jnp.float32), jnp.zeros((bs,), jnp.float32))
    m, l = run_two_loops(cnt_ref, step, init, masked_first=False)
    lse_ref[...] = jnp.where(l == 0.0, jnp.inf, m + jnp.log2(jnp.where(l == 0.0, 1.0, l)))


def _pool_kernel(idx_ref, cnt_ref, qseg_ref, kseg_ref, q_ref, k_ref, lse_ref, out_ref, **kw):
    bs = kw["dims"].block
    lse = lse_ref[...]
    tile = _tile_fn(q_ref, k_ref, qseg_ref, kseg_ref, **kw)

    def step(t, carry, *, masked):
        kb = idx_ref[t]
        # log2 of P; rows with lse = +inf (none visible, or padding) give -inf.
        s = tile(pl.multiple_of(kb * bs, bs), masked=masked) - lse[:, None]
        out_ref[kb] = jnp.exp2(jnp.max(s))  # one reduce over both axes (see the Triton lowering)
        return carry

    run_two_loops(cnt_ref, step, 0, masked_first=False)


class _Setup(NamedTuple):
    dims: Dims
    possible: jax.Array  # bool [B, nQ, nK]
    qp: jax.Array
    kp: jax.Array
    lists: tuple[jax.Array, ...]  # idx, counts, query ids, key ids
    call: Callable
    specs: list
    row_vec: pl.BlockSpec
    kernel_kw: dict
    qb: Callable  # grid index -> query block


def _lists(d: Dims, causal: bool, seg):
    """Dense tile lists per batch row: idx int32 [B, nQ, nK], counts [B, nQ, 2], possible [B, nQ, nK]."""
    possible, full = common.tile_classes(d, causal)
    if seg is None:
        # Static and shared: the possible tiles of a row are the key blocks [0, n_all), the full
        # ones a prefix of those.
        n_all = possible.sum(1)
        cols = np.arange(d.n_k)
        idx = np.where(cols < n_all[:, None], cols, -1)
        cnt = np.stack([(possible & full).sum(1), n_all], 1)
        shape = (d.batch, d.n_q)
        return (jnp.broadcast_to(jnp.asarray(idx, jnp.int32), shape + (d.n_k,)),
                jnp.broadcast_to(jnp.asarray(cnt, jnp.int32), shape + (2,)),
                jnp.broadcast_to(jnp.asarray(possible), shape + (d.n_k,)))
    doc_possible, doc_uniform = common.segment_tile_classes(seg, d)
    mask = possible & doc_possible[:, 0]
    idx, cnt = common.block_lists(mask, full & doc_uniform[:, 0])
    return idx, cnt, mask


def _setup(q, k, block_size, causal, sm_scale, segment_ids, interpret) -> _Setup:
    d = common.scores_dims(q, k, block_size)
    seg = common.segment_ids_pair(segment_ids, d)
    dh = common.padded_head_dim(d.head_dim)
    bs = d.block
    qp = common.pad_axis(common.pad_axis(q, 1, d.n_q * bs), 3, dh)
    kp = common.pad_axis(common.pad_axis(k, 1, d.n_k * bs), 3, dh)
    idx, cnt, possible = _lists(d, causal, seg)
    # Ids padded by repeating the last one; unread (zeros) without segment ids.
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), mode="edge")  # noqa: E731
    ids = (pad(seg.q, d.n_q * bs), pad(seg.kv, d.n_k * bs)) if seg is not None else (
        jnp.zeros((d.batch, d.n_q * bs), jnp.int32), jnp.zeros((d.batch, d.n_k * bs), jnp.int32))

    qb = functools.partial(query_block, n_q=d.n_q, reverse=causal)
    specs = [pl.BlockSpec((None, None, d.n_k), lambda i, b, h: (b, qb(i), 0)),
             pl.BlockSpec((None, None, 2), lambda i, b, h: (b, qb(i), 0)),
             pl.BlockSpec((None, bs), lambda i, b, h: (b, qb(i))),
             pl.BlockSpec((None, d.n_k * bs), lambda i, b, h: (b, 0)),
             pl.BlockSpec((None, bs, None, dh), lambda i, b, h: (b, qb(i), h, 0)),
             pl.BlockSpec((None, kp.shape[1], None, dh), lambda i, b, h: (b, 0, h // d.group, 0))]
    row_vec = pl.BlockSpec((None, None, bs), lambda i, b, h: (b, h, qb(i)))
    tune = current_tuning(bs, dh)
    call = functools.partial(pallas, grid=(d.n_q, d.batch, d.q_heads), warps=tune.fwd_warps,
                             stages=tune.fwd_stages, interpret=interpret)
    kernel_kw = dict(dims=d, causal=causal, scale=common.default_scale(sm_scale, d.head_dim),
                     precision=dot_precision(q.dtype), segmented=seg is not None)
    return _Setup(d, possible, qp, kp, (idx, cnt, *ids), call, specs, row_vec, kernel_kw, qb)


def _row_lse(st: _Setup):
    d = st.dims
    t_p = st.qp.shape[1]
    lse = st.call(functools.partial(_lse_kernel, **st.kernel_kw), in_specs=st.specs,
                  out_specs=st.row_vec, out_shape=jax.ShapeDtypeStruct((d.batch, d.q_heads, t_p), jnp.float32),
                  name="block_scores_lse")(*st.lists, st.qp, st.kp)
    # Padded query rows must not enter the max: +inf LSE makes their probabilities 0.
    return jnp.where(jnp.arange(t_p) < d.seq_q, lse, jnp.inf)


def row_lse(q, k, *, block_size=64, causal=True, sm_scale=None, segment_ids=None, interpret=False):
    """Pass 1 alone: base-2 LSE of the dense (causal) rows, f32 [B, N, nQ*bs] (+inf on padding).

    Exposed so benchmarks can split the cost of the two passes.
    """
    return _row_lse(_setup(q, k, block_size, causal, sm_scale, segment_ids, interpret))


def block_attention_scores(q, k, *, block_size=64, causal=True, sm_scale=None, segment_ids=None,
                           interpret=False):
    """Block ground truth of the dense softmax map: f32 [B, N, nQ, nK].

    Args:
      q: [B, T, N, D]; k: [B, S, K, D] (GQA: query head h reads kv head h // (N // K)).
      block_size: bs, one of 16, 32, 64, 128 (the tile of the max-pool).
      causal: end-aligned causal map; tiles with no visible pair are 0.
      sm_scale: logit scale, default 1/sqrt(D).
      segment_ids: None, int [B, T] (S == T) or `common.SegmentIds`: the map of each document alone.
      interpret: run the kernels in the Pallas interpreter (CPU).
    Returns, per (query block i, key block j), max_{rows of i, keys of j} softmax probability,
    normalised so each row sums to 1 over j (rows with no visible key are all 0).
    """
    st = _setup(q, k, block_size, causal, sm_scale, segment_ids, interpret)
    d = st.dims
    lse = _row_lse(st)
    out_spec = pl.BlockSpec((None, None, None, d.n_k), lambda i, b, h: (b, h, st.qb(i), 0))
    raw = st.call(functools.partial(_pool_kernel, **st.kernel_kw), in_specs=[*st.specs, st.row_vec],
                  out_specs=out_spec, out_shape=jax.ShapeDtypeStruct((d.batch, d.q_heads, d.n_q, d.n_k), jnp.float32),
                  name="block_scores_pool")(*st.lists, st.qp, st.kp, lse)
    # The kernel writes only the possible tiles.
    return common.normalise_rows(jnp.where(st.possible[:, None], raw, 0.0))
