"""Block-sparse flash attention on the Pallas Triton lowering: forward, dq and dk/dv kernels.

FlashAttention-2 restricted to the selected (query block, key block) tiles of a bool block mask.
The Triton lowering has no scalar prefetch, so each program loads its own index list from global
memory and loops over it with a dynamic trip count:

  forward  grid (nQ, B, N): one query block, loop over its selected key blocks, online softmax in
           base 2 (exp2 of log2(e)-scaled logits); writes o and the base-2 row LSE, and with
           `row_maxima` each row's maximum logit per key block (`attention_with_block_scores`:
           the block ground truth as a by-product of a dense forward).
  dq       grid (nQ, B, N): same lists, recomputes p from the LSE; ds = p * (dp - delta).
  dk/dv    grid (nK, B, N): one key block, loop over the query blocks that selected it (the
           transposed lists, built with a cumsum + scatter). GQA: dk/dv are written per query head
           and summed over the group outside, so K/V are never repeated in memory.

A token-level `Selection` (one list per query token) is handed to `token_kernel`; a tile-level
one becomes a block mask. Segment ids add tile classes: tiles between documents are dropped,
tiles inside one document keep their causal class, the others compare ids in the masked loop.
A sliding window does the same with positions: tiles below every row's window are dropped, tiles
inside the band keep their causal class, tiles crossing its lower edge are masked.

Each list is ordered so that the tiles needing an elementwise mask (the causal diagonal, the
window's lower edge, the ragged last key block) form a prefix or suffix: the kernels run two
loops, and only the short one pays for `where`. Ragged lengths are zero-padded to a whole block,
non power-of-two head dims to the next power of two.

The kernels are deprecated with the Triton backend in JAX 0.11 (we pin jax<0.13); the public API
in `sparsetrain.ops` keeps the same signature so a Mosaic GPU version can replace this file.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.block_sparse import common, flash
from pallas_kernels.block_sparse.common import LN2, LOG2E, Dims
# Launch helpers are re-exported: tests and benchmarks use kernel.poison_outputs / kernel.tuning.
from pallas_kernels.block_sparse.launch import (Tuning, current_tuning, dot_precision, pallas,
                                                poison_outputs, tuning)
from pallas_kernels.block_sparse.selection import Selection
from pallas_kernels.block_sparse.token_kernel import token_block_sparse_attention

__all__ = ["Tuning", "attention_with_block_scores", "block_sparse_attention", "current_tuning",
           "dot_precision", "pallas", "poison_outputs", "tuning"]


# ------------------------------------------------------------------------------------------------
# Shared pieces of the kernel bodies.

def visible(rows, cols, *, causal: bool, offset: int, seq_kv: int, window=None, same_doc=None):
    """Elementwise mask of a tile: real keys, (causal) keys at or before the query position, (window)
    keys after the position minus `window`, and (`same_doc`, from segment ids) keys of the query's
    document."""
    keep = cols < seq_kv
    if causal:
        keep = keep & (cols <= rows + offset)
    if window is not None:
        keep = keep & (cols > rows + offset - window)
    if same_doc is not None:
        keep = keep & same_doc
    return keep


def logits_tile(q, k_ref, start, rows, *, dims: Dims, causal: bool, scale: float, masked: bool,
                precision, docs=None, window=None, bias_ref=None):
    """Base-2 logits [bq, bs] of a query tile against the key block at `start` (-inf where hidden).

    docs: None, or (row ids [bq], ref of the key ids) when segment ids are given; window: as
    `visible`; bias_ref: None, or the ref of the base-2 key bias [S_p] added to every row.
    """
    bs = dims.block
    s = pltr.dot(q, k_ref[pl.ds(start, bs), :], trans_b=True, precision=precision) * (scale * LOG2E)
    if bias_ref is not None:
        s = s + bias_ref[pl.ds(start, bs)][None, :]
    if masked:
        same_doc = None
        if docs is not None:
            row_ids, kseg_ref = docs
            same_doc = row_ids[:, None] == kseg_ref[pl.ds(start, bs)][None, :]
        keep = visible(rows[:, None], start + jnp.arange(bs)[None, :], causal=causal,
                       offset=dims.offset, seq_kv=dims.seq_kv, window=window, same_doc=same_doc)
        s = jnp.where(keep, s, -jnp.inf)
    return s


def run_two_loops(cnt_ref, step, carry, *, masked_first: bool):
    """Loops t over [0, cnt[0]) then [cnt[0], cnt[1]); `step(t, carry, masked)`."""
    split, total = cnt_ref[0], cnt_ref[1]
    first, second = (True, False) if masked_first else (False, True)
    carry = lax.fori_loop(0, split, functools.partial(step, masked=first), carry)
    return lax.fori_loop(split, total, functools.partial(step, masked=second), carry)


def query_block(i, n_q: int, reverse: bool):
    # Causal rows grow with the block index: launching the longest rows first shortens the tail.
    return n_q - 1 - i if reverse else i


@dataclasses.dataclass(frozen=True)
class _Config:
    dims: Dims
    causal: bool
    window: int | None  # from `common.check_window`: None when it hides nothing
    scale: float
    interpret: bool
    segmented: bool  # segment ids given: masked tiles also compare document ids
    # A key bias is added to the logits (DMA, NOSA) and the dk/dv kernel also writes its gradient.
    biased: bool = False
    # BLASST: log2(lambda), or None (off). The forward skips a tile's exp, V load and PV product
    # when every row's tile maximum is below its running maximum + log2(lambda), and records which
    # tiles it skipped; the backward runs over the tiles it did not skip (per query head).
    skip_log2: float | None = None
    # The forward also writes each row's maximum base-2 logit per visited key block (the block
    # ground truth's by-product, `attention_with_block_scores`).
    row_maxima: bool = False


# ------------------------------------------------------------------------------------------------
# Kernels.

def _docs(qseg_ref, kseg_ref, cfg: _Config):
    """`logits_tile`'s docs argument: this tile's query ids and the key ids, or None."""
    return (qseg_ref[...], kseg_ref) if cfg.segmented else None


def _bias(bias_ref, cfg: _Config):
    """`logits_tile`'s bias_ref argument: the key bias, or None (an unread placeholder)."""
    return bias_ref if cfg.biased else None


def _fwd_kernel(idx_ref, cnt_ref, qseg_ref, kseg_ref, bias_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                *extra_refs, cfg: _Config, precision):
    d, bs = cfg.dims, cfg.dims.block
    qi = query_block(pl.program_id(0), d.n_q, cfg.causal)
    q = q_ref[...]
    rows = qi * bs + jnp.arange(bs)
    tile = functools.partial(logits_tile, q, k_ref, rows=rows, dims=d, causal=cfg.causal,
                             scale=cfg.scale, precision=precision, docs=_docs(qseg_ref, kseg_ref, cfg),
                             window=cfg.window, bias_ref=_bias(bias_ref, cfg))

    def step(t, carry, *, masked):
        kb = idx_ref[t]
        start = pl.multiple_of(kb * bs, bs)
        s = tile(start, masked=masked)
        row_max = None
        if cfg.row_maxima:
            # maxima [nK, bs]: one contiguous row of bs floats a visited tile (a coalesced store).
            row_max = s.max(axis=1)
            extra_refs[0][kb, :] = row_max

        def update(carry):
            return flash.softmax_update(carry, s, v_ref[pl.ds(start, bs), :], may_be_empty=masked,
                                        precision=precision, row_max=row_max)

        if cfg.skip_log2 is None:
            return update(carry)
        # BLASST: exp2(tile max - running max) < lambda in every real row. A row that has seen
        # nothing yet (running max -inf) never skips, nor does one whose tile is all hidden (both -inf).
        row_max = s.max(axis=1)
        skip = jnp.all((row_max < carry[1] + cfg.skip_log2) | (rows >= d.seq_q))
        extra_refs[-1][kb] = skip.astype(jnp.int32)
        return lax.cond(skip, lambda c: c, update, carry)

    carry = run_two_loops(cnt_ref, step, flash.softmax_init(bs, q.shape[-1]), masked_first=False)
    o, lse = flash.softmax_finish(*carry)
    lse_ref[...] = lse
    o_ref[...] = o.astype(o_ref.dtype)


def _dq_kernel(idx_ref, cnt_ref, qseg_ref, kseg_ref, bias_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, cfg: _Config, precision):
    d, bs = cfg.dims, cfg.dims.block
    qi = query_block(pl.program_id(0), d.n_q, cfg.causal)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = qi * bs + jnp.arange(bs)
    tile = functools.partial(logits_tile, q, k_ref, rows=rows, dims=d, causal=cfg.causal,
                             scale=cfg.scale, precision=precision, docs=_docs(qseg_ref, kseg_ref, cfg),
                             window=cfg.window, bias_ref=_bias(bias_ref, cfg))

    def step(t, dq, *, masked):
        start = pl.multiple_of(idx_ref[t] * bs, bs)
        s = tile(start, masked=masked)
        k = k_ref[pl.ds(start, bs), :]
        v = v_ref[pl.ds(start, bs), :]
        p = jnp.exp2(s - lse[:, None])
        dp = pltr.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        return dq + pltr.dot(ds.astype(k.dtype), k, precision=precision)

    dq = run_two_loops(cnt_ref, step, jnp.zeros(q.shape, jnp.float32), masked_first=False)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, qseg_ref, kseg_ref, bias_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *dbias_ref, cfg: _Config, precision):
    # Works on transposed tiles (keys x queries) so that every product is a plain or trans_b dot.
    d, bs = cfg.dims, cfg.dims.block
    k, v = k_ref[...], v_ref[...]
    key_bias = bias_ref[...] if cfg.biased else None
    col_ids = kseg_ref[...] if cfg.segmented else None
    cols = pl.program_id(0) * bs + jnp.arange(bs)
    c = cfg.scale * LOG2E

    def step(t, carry, *, masked):
        dk, dv, dbias = carry
        start = pl.multiple_of(idx_ref[t] * bs, bs)
        q = q_ref[pl.ds(start, bs), :]
        do = do_ref[pl.ds(start, bs), :]
        lse = lse_ref[pl.ds(start, bs)]
        delta = delta_ref[pl.ds(start, bs)]
        st = pltr.dot(k, q, trans_b=True, precision=precision) * c  # [keys, queries]
        if key_bias is not None:
            st = st + key_bias[:, None]
        if masked:
            same_doc = None
            if cfg.segmented:
                same_doc = col_ids[:, None] == qseg_ref[pl.ds(start, bs)][None, :]
            keep = visible(start + jnp.arange(bs)[None, :], cols[:, None], causal=cfg.causal,
                           offset=d.offset, seq_kv=d.seq_kv, window=cfg.window, same_doc=same_doc)
            st = jnp.where(keep, st, -jnp.inf)
        pt = jnp.exp2(st - lse[None, :])
        dv = dv + pltr.dot(pt.astype(do.dtype), do, precision=precision)
        dpt = pltr.dot(v, do, trans_b=True, precision=precision)
        dst = pt * (dpt - delta[None, :])
        dk = dk + pltr.dot(dst.astype(q.dtype), q, precision=precision)
        if key_bias is not None:
            # dst is the gradient of the natural-log logit, which the bias enters with slope 1.
            dbias = dbias + dst.sum(axis=1)
        return dk, dv, dbias

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv, dbias = run_two_loops(cnt_ref, step, (zeros, zeros, jnp.zeros((bs,), jnp.float32)),
                                  masked_first=True)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if cfg.biased:
        dbias_ref[0][...] = dbias


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays here are padded: T_p = nQ*bs, S_p = nK*bs, D_p a power of two.

def _row_specs(cfg: _Config, n_rows: int, reverse: bool):
    """BlockSpecs of a (query block, batch, head) grid: lists, counts, the tile's query ids, all
    key ids and the key bias of the head's kv head."""
    d = cfg.dims
    qb = functools.partial(query_block, n_q=n_rows, reverse=reverse)
    lists = pl.BlockSpec((None, None, None, d.n_k), lambda i, b, h: (b, h // d.mask_group, qb(i), 0))
    counts = pl.BlockSpec((None, None, None, 2), lambda i, b, h: (b, h // d.mask_group, qb(i), 0))
    qseg = pl.BlockSpec((None, d.block), lambda i, b, h: (b, qb(i)))
    kseg = pl.BlockSpec((None, d.n_k * d.block), lambda i, b, h: (b, 0))
    bias = pl.BlockSpec((None, None, d.n_k * d.block), lambda i, b, h: (b, h // d.group, 0))
    return qb, [lists, counts, qseg, kseg, bias]


def _forward(q, k, v, idx, cnt, seg, bias2, cfg: _Config):
    d, bs = cfg.dims, cfg.dims.block
    b, t_p, n, dh = q.shape
    s_p = k.shape[1]
    qb, list_specs = _row_specs(cfg, d.n_q, cfg.causal)
    tune = current_tuning(bs, dh)
    q_tile = pl.BlockSpec((None, bs, None, dh), lambda i, b, h: (b, qb(i), h, 0))
    kv_all = pl.BlockSpec((None, s_p, None, dh), lambda i, b, h: (b, 0, h // d.group, 0))
    out_specs = [q_tile, pl.BlockSpec((None, None, bs), lambda i, b, h: (b, h, qb(i)))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t_p), jnp.float32)]
    if cfg.row_maxima:  # f32 [B, N, nK, T_p], written only in the visited tiles
        out_specs.append(pl.BlockSpec((None, None, d.n_k, bs), lambda i, b, h: (b, h, 0, qb(i))))
        out_shape.append(jax.ShapeDtypeStruct((b, n, d.n_k, t_p), jnp.float32))
    if cfg.skip_log2 is not None:  # int32 [B, N, nQ, nK]: 1 = skipped, written only in the visited tiles
        out_specs.append(pl.BlockSpec((None, None, None, d.n_k), lambda i, b, h: (b, h, qb(i), 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, n, d.n_q, d.n_k), jnp.int32))
    return pallas(
        functools.partial(_fwd_kernel, cfg=cfg, precision=dot_precision(q.dtype)),
        grid=(d.n_q, b, n),
        in_specs=[*list_specs, q_tile, kv_all, kv_all],
        out_specs=out_specs, out_shape=out_shape,
        warps=tune.fwd_warps, stages=tune.fwd_stages, interpret=cfg.interpret,
        name="block_sparse_fwd_row_maxima" if cfg.row_maxima else "block_sparse_fwd")(idx, cnt, *seg, bias2,
                                                                                    q, k, v)


def _backward(q, k, v, do, lse, delta, mask, full, seg, bias2, cfg: _Config):
    d, bs = cfg.dims, cfg.dims.block
    b, t_p, n, dh = q.shape
    s_p = k.shape[1]
    tune = current_tuning(bs, dh)
    precision = dot_precision(q.dtype)

    idx, cnt = common.block_lists(mask, full)
    qb, list_specs = _row_specs(cfg, d.n_q, cfg.causal)
    q_tile = pl.BlockSpec((None, bs, None, dh), lambda i, b, h: (b, qb(i), h, 0))
    kv_all = pl.BlockSpec((None, s_p, None, dh), lambda i, b, h: (b, 0, h // d.group, 0))
    row_vec = pl.BlockSpec((None, None, bs), lambda i, b, h: (b, h, qb(i)))
    dq = pallas(
        functools.partial(_dq_kernel, cfg=cfg, precision=precision),
        grid=(d.n_q, b, n),
        in_specs=[*list_specs, q_tile, kv_all, kv_all, q_tile, row_vec, row_vec],
        out_specs=q_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        warps=tune.bwd_warps, stages=tune.bwd_stages, interpret=cfg.interpret,
        name="block_sparse_dq")(idx, cnt, *seg, bias2, q, k, v, do, lse, delta)

    # Transposed lists: per key block, the query blocks that selected it; masked tiles first.
    idx_t, cnt_t = common.transposed_block_lists(mask, full)
    lists_t = pl.BlockSpec((None, None, None, d.n_q), lambda j, b, h: (b, h // d.mask_group, j, 0))
    counts_t = pl.BlockSpec((None, None, None, 2), lambda j, b, h: (b, h // d.mask_group, j, 0))
    qseg_all = pl.BlockSpec((None, t_p), lambda j, b, h: (b, 0))
    kseg_tile = pl.BlockSpec((None, bs), lambda j, b, h: (b, j))
    bias_tile = pl.BlockSpec((None, None, bs), lambda j, b, h: (b, h // d.group, j))
    q_all = pl.BlockSpec((None, t_p, None, dh), lambda j, b, h: (b, 0, h, 0))
    kv_tile = pl.BlockSpec((None, bs, None, dh), lambda j, b, h: (b, j, h // d.group, 0))
    row_all = pl.BlockSpec((None, None, t_p), lambda j, b, h: (b, h, 0))
    dkv_tile = pl.BlockSpec((None, bs, None, dh), lambda j, b, h: (b, j, h, 0))
    # Per query head; with GQA accumulate in f32 and sum over the group below.
    dkv_dtype = k.dtype if d.group == 1 else jnp.float32
    out_specs = [dkv_tile, dkv_tile]
    out_shape = [jax.ShapeDtypeStruct((b, s_p, n, dh), dkv_dtype)] * 2
    if cfg.biased:  # f32 [B, N, S_p] per query head, summed over the group below
        out_specs.append(pl.BlockSpec((None, None, bs), lambda j, b, h: (b, h, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, n, s_p), jnp.float32))
    dk, dv, *dbias = pallas(
        functools.partial(_dkv_kernel, cfg=cfg, precision=precision),
        grid=(d.n_k, b, n),
        in_specs=[lists_t, counts_t, qseg_all, kseg_tile, bias_tile, q_all, kv_tile, kv_tile, q_all, row_all,
                  row_all],
        out_specs=out_specs, out_shape=out_shape,
        warps=tune.bwd_warps, stages=tune.bwd_stages, interpret=cfg.interpret,
        name="block_sparse_dkv")(idx_t, cnt_t, *seg, bias2, q, k, v, do, lse, delta)
    if d.group > 1:
        dk = dk.reshape(b, s_p, d.kv_heads, d.group, dh).sum(3).astype(k.dtype)
        dv = dv.reshape(b, s_p, d.kv_heads, d.group, dh).sum(3).astype(v.dtype)
    dbias = dbias[0].reshape(b, d.kv_heads, d.group, s_p).sum(2) if cfg.biased else None
    return dq, dk, dv, dbias


# ------------------------------------------------------------------------------------------------
# custom_vjp glue: padding, selection restricted to possible tiles, natural-log LSE.

def _pad(x, seq: int, dh: int):
    return common.pad_axis(common.pad_axis(x, 1, seq), 3, dh)


def _restricted(block_mask, seg: common.SegmentIds, cfg: _Config):
    """`common.restricted_tiles` of this call (ids only when segmented)."""
    return common.restricted_tiles(block_mask, seg if cfg.segmented else None, cfg.dims, cfg.causal, cfg.window)


def _padded_ids(seg: common.SegmentIds, cfg: _Config) -> common.SegmentIds:
    """Ids padded to whole blocks by repeating the last one (padded keys are hidden anyway)."""
    d = cfg.dims
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), mode="edge")  # noqa: E731
    return common.SegmentIds(pad(seg.q, d.n_q * d.block), pad(seg.kv, d.n_k * d.block))


def _scores_from_row_maxima(maxima, lse2, visited, seq_q: int):
    """Block ground truth f32 [B, N, nQ, nK] from the forward's row maxima.

    maxima f32 [B, N, nK, T_p]: each row's maximum base-2 logit per key block, defined only in the
    visited tiles; lse2 f32 [B, N, T_p], the final base-2 LSE (+inf for rows with no key); visited
    bool [B, N, nQ, nK]. max over a tile of P = max over its rows of exp2(row max - lse): one exp2
    per tile, as `scores.block_attention_scores`' pool pass.
    """
    b, n, n_k, t_p = maxima.shape
    n_q = visited.shape[2]
    # Padded query rows are no part of the map: +inf makes their probabilities 0.
    lse2 = jnp.where(jnp.arange(t_p) < seq_q, lse2, jnp.inf)
    log_p = (maxima - lse2[:, :, None, :]).reshape(b, n, n_k, n_q, t_p // n_q).max(-1)
    raw = jnp.swapaxes(jnp.exp2(log_p), -1, -2)
    return common.normalise_rows(jnp.where(visited, raw, 0.0))  # unvisited tiles were never written


def _padded_bias(bias, cfg: _Config):
    """The key bias in base-2 units (the kernels' logits), zero-padded to whole blocks."""
    return common.pad_axis(bias.astype(jnp.float32) * LOG2E, 2, cfg.dims.n_k * cfg.dims.block)


def no_bias(dims: Dims):
    """The unread key-bias placeholder of a call without bias (one kernel signature)."""
    return jnp.zeros((dims.batch, dims.kv_heads, dims.seq_kv), jnp.float32)


def _fwd_impl(q, k, v, block_mask, seg, bias, cfg: _Config):
    """(o, natural LSE, base-2 padded LSE, block scores or None, skipped tiles or None); the scores
    only with cfg.row_maxima, pooled from the kernel's row maxima in XLA; the skipped tiles (bool
    [B, N, nQ, nK]) only with cfg.skip_log2."""
    d = cfg.dims
    dh = common.padded_head_dim(d.head_dim)
    mask, full = _restricted(block_mask, seg, cfg)
    idx, cnt = common.block_lists(mask, full)
    qp = _pad(q, d.n_q * d.block, dh)
    kp, vp = (_pad(x, d.n_k * d.block, dh) for x in (k, v))
    o, lse2, *extra = _forward(qp, kp, vp, idx, cnt, _padded_ids(seg, cfg), _padded_bias(bias, cfg), cfg)
    scores = skipped = None
    visited = jnp.repeat(jnp.broadcast_to(mask, block_mask.shape), d.mask_group, axis=1)
    if cfg.row_maxima:
        scores = _scores_from_row_maxima(extra[0], lse2, visited, d.seq_q)
    if cfg.skip_log2 is not None:
        skipped = visited & (extra[-1] == 1)  # unvisited tiles were never written
    o = o[:, :d.seq_q, :, :d.head_dim]
    lse = jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * LN2)[..., :d.seq_q]
    return o, lse, lse2, scores, skipped


def _per_query_head(cfg: _Config) -> _Config:
    """cfg for a mask with one head per query head (the backward of a BLASST forward)."""
    return dataclasses.replace(cfg, dims=dataclasses.replace(cfg.dims, mask_heads=cfg.dims.q_heads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, block_mask, seg, bias, cfg: _Config):
    o, lse, _, scores, skipped = _fwd_impl(q, k, v, block_mask, seg, bias, cfg)
    return o, lse, scores, skipped


def _attention_fwd(q, k, v, block_mask, seg, bias, cfg: _Config):
    o, lse, lse2, scores, skipped = _fwd_impl(q, k, v, block_mask, seg, bias, cfg)
    if skipped is not None:
        # The backward differentiates what the forward computed: the tiles it did not skip, per
        # query head (the recorded decisions; recomputing them from the final LSE would differ).
        block_mask = _restricted(block_mask, seg, cfg)[0]
        block_mask = jnp.repeat(jnp.broadcast_to(block_mask, skipped.shape[:1] + block_mask.shape[1:]),
                                cfg.dims.mask_group, axis=1) & ~skipped
    return (o, lse, scores, skipped), (q, k, v, block_mask, seg, bias, o, lse2)


def vjp_backward(cfg: _Config, res, cotangents, backward):
    """Gradients of (q, k, v, mask, ids, bias) from the forward's residuals, with `backward` (this
    module's `_backward` or another backend's kernels, same signature) on padded arrays; the key
    bias gets one only when cfg.biased."""
    q, k, v, block_mask, seg, bias, o, lse2 = res
    do, dlse = cotangents[:2]  # block scores are a distillation target, skips a record: no gradient
    if cfg.skip_log2 is not None:
        cfg = _per_query_head(cfg)
    d = cfg.dims
    dh = common.padded_head_dim(d.head_dim)
    t_p, s_p = d.n_q * d.block, d.n_k * d.block
    # d(lse)/d(s) = p, so an LSE cotangent enters exactly like -delta: ds = p * (dp - delta + dlse).
    delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    dq, dk, dv, dbias = backward(
        _pad(q, t_p, dh), _pad(k, s_p, dh), _pad(v, s_p, dh), _pad(do.astype(q.dtype), t_p, dh),
        lse2, common.pad_axis(delta, 2, t_p), *_restricted(block_mask, seg, cfg),
        _padded_ids(seg, cfg), _padded_bias(bias, cfg), cfg)
    cut = lambda x, n: x[:, :n, :, :d.head_dim]  # noqa: E731
    dbias = None if dbias is None else dbias[..., :d.seq_kv].astype(bias.dtype)
    return cut(dq, d.seq_q), cut(dk, d.seq_kv), cut(dv, d.seq_kv), None, None, dbias


def _attention_bwd(cfg: _Config, res, cotangents):
    return vjp_backward(cfg, res, cotangents, _backward)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None,
                           segment_ids=None, window=None, key_bias=None, skip_threshold=None, interpret=False,
                           return_lse=False, return_skipped=False):
    """Softmax attention restricted to the selected blocks (Pallas Triton kernels).

    Args:
      q: [B, T, N, D]; k, v: [B, S, K, D] with N a multiple of K (query head h uses kv head h // G).
      block_mask: bool [B, H, ceil(T/bs), ceil(S/bs)], H = K (shared by a GQA group) or N; or a
        `Selection`: tile granularity (the same rows as lists) or token granularity (lists
        [B, H, T, m] per query token, run by `token_kernel`).
      causal: also mask keys after the query position (aligned at the end when S != T).
      block_size: bs, one of 16, 32, 64, 128.
      sm_scale: logit scale, default 1/sqrt(D).
      segment_ids: None, int [B, T] (S == T), or `common.SegmentIds(q [B, T], kv [B, S])`: a query
        sees only keys with its id. Tiles of one document cost nothing extra, tiles of two
        disjoint id ranges are skipped, the others pay an id compare.
      window: None, or w >= 1 with causal: a query at position p sees only keys > p - w. Tiles
        below every row's window are skipped, tiles inside it cost nothing extra, tiles crossing
        its lower edge pay a position compare.
      key_bias: None, or float [B, K, S] added to the scaled logits of every query of kv head k's
        group (DMA / NOSA); its gradient comes from the dk/dv kernel (one row sum a visited tile).
        Token selections raise NotImplementedError.
      skip_threshold: BLASST's lambda, None (off) or in [0, 1): the forward skips a tile's exp, V
        load and PV product when exp(tile max - running max) < lambda in every row of the tile, and
        the backward skips the same tiles (their decisions are recorded). 0 skips nothing.
        Token selections raise NotImplementedError.
      interpret: run the kernels in the Pallas interpreter (CPU).
      return_lse: also return the natural-log LSE of each row's scaled logits, f32 [B, N, T]
        (-inf for rows with no visible key, whose output is 0).
    Returns o [B, T, N, D] in q's dtype (and the LSE; and with return_skipped, bool [B, N, nQ, nK]:
    the tiles BLASST skipped, all False without skip_threshold). Differentiable in q, k, v, key_bias
    (and through LSE).
    """
    if isinstance(block_mask, Selection) and block_mask.granularity == "token":
        if key_bias is not None or skip_threshold is not None or return_skipped:
            raise NotImplementedError("key_bias and skip_threshold with a token-level Selection are not supported "
                                      "yet; use a tile selection (a block mask)")
        return token_block_sparse_attention(q, k, v, block_mask, causal=causal, block_size=block_size,
                                            sm_scale=sm_scale, segment_ids=segment_ids, window=window,
                                            interpret=interpret, return_lse=return_lse)
    if isinstance(block_mask, Selection):
        block_mask = block_mask.to_mask()
    seg, cfg = _checked_call(q, k, v, block_mask, causal=causal, block_size=block_size, sm_scale=sm_scale,
                             segment_ids=segment_ids, window=window, interpret=interpret,
                             biased=key_bias is not None, skip_threshold=skip_threshold)
    bias = no_bias(cfg.dims) if key_bias is None else common.check_key_bias(key_bias, cfg.dims)
    o, lse, _, skipped = _attention(q, k, v, block_mask, seg, bias, cfg)
    if return_skipped and skipped is None:
        d = cfg.dims
        skipped = jnp.zeros((d.batch, d.q_heads, d.n_q, d.n_k), bool)
    outs = (o, *((lse,) if return_lse else ()), *((skipped,) if return_skipped else ()))
    return outs if len(outs) > 1 else o


def attention_with_block_scores(q, k, v, *, block_size=64, causal=True, sm_scale=None, segment_ids=None,
                                interpret=False):
    """Dense (causal) attention and SeerAttention's block ground truth from one forward pass.

    The forward runs over every possible tile (as `block_sparse_attention` with an all-True mask)
    and also writes each row's maximum logit per key block, f32 [B, N, nK, nQ*bs] (4 bytes per
    (row, key block), only the visited tiles are written); XLA then pools it against the final
    LSE. Arguments as `block_sparse_attention` (block_size is both the tile and the scores' block).
    Returns (o [B, T, N, D], scores f32 [B, N, nQ, nK]) with the semantics of
    `scores.block_attention_scores`. o is differentiable in q, k, v (the block-sparse backward at
    full density); the scores get no gradient.
    """
    common.check_qkv(q, k, v, block_size)
    every_tile = common.every_tile(q, k, block_size)
    seg, cfg = _checked_call(q, k, v, every_tile, causal=causal, block_size=block_size, sm_scale=sm_scale,
                             segment_ids=segment_ids, window=None, interpret=interpret, row_maxima=True)
    o, _, scores, _ = _attention(q, k, v, every_tile, seg, no_bias(cfg.dims), cfg)
    return o, scores


def _checked_call(q, k, v, block_mask, *, causal, block_size, sm_scale, segment_ids, window, interpret,
                  row_maxima=False, biased=False, skip_threshold=None):
    """Validated (segment ids, config) of a tile-mask call; placeholder ids when none are given."""
    dims = common.attention_dims(q, k, v, block_mask, block_size)
    seg = common.segment_ids_pair(segment_ids, dims)
    skip_log2 = common.skip_log2(skip_threshold)
    if skip_log2 == -math.inf:
        # lambda = 0 skips nothing: the plain loop, bit for bit (a branch per tile would compile
        # the update differently and round differently).
        skip_log2 = None
    cfg = _Config(dims, bool(causal), common.check_window(window, causal, dims.seq_kv),
                  common.default_scale(sm_scale, dims.head_dim), bool(interpret), segmented=seg is not None,
                  row_maxima=row_maxima, biased=biased, skip_log2=skip_log2)
    if seg is None:  # unread placeholders keep one kernel signature
        seg = common.SegmentIds(jnp.zeros((dims.batch, dims.seq_q), jnp.int32),
                                jnp.zeros((dims.batch, dims.seq_kv), jnp.int32))
    return seg, cfg
