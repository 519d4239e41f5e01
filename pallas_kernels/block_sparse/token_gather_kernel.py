"""Per-token block selection in key-block-outer order (FSA / FlashMoBA's loop), Pallas Triton.

The query-outer token kernel (`token_kernel.py`) fills a tile with the heads of a few consecutive
tokens and loops over the union of their lists: with small groups (G = 1 for lists per query head,
G = 3-4 for GQA models) the tile has few rows, or its tokens' unrelated lists make the union long.
Here every program owns one key block instead and gathers the rows that selected it:

  lists   For each selection head, the entries (token t, slot i) of the cleaned lists are sorted by
          (key block, token) in XLA: `order` [B, H, E] (E = T * m, entry f = t * m + i). Key block
          j's rows are its entries times the Gs query heads sharing them: row v of block j is entry
          order[off_j + v // Gs] and head v % Gs. Any Gs works (3 included): rows, not tokens, fill
          the tile.
  forward grid (P, B, H): program p covers up to `chunks * rows` rows of one key block (a table
          built in XLA), loads that block's K/V once and, per chunk of `rows` rows, gathers their q,
          runs one softmax over the block and scatters the normalised partial output and its base-2
          LSE to the entry's slot: o_part [B, E + 1, N, D] in q's dtype, lse_part [B, E + 1, N]
          (row E takes the padding rows' writes). An XLA reduce merges each token's m slots.
  backward grid (P, B, H), the same programs: per chunk, gather q, dO, the final LSE and delta,
          accumulate dK/dV of the block in registers and scatter the chunk's dQ partial (f32) to
          the entry's slot; dQ is the sum over slots (XLA), dK/dV the sum over the programs of
          each block and the selection heads of each kv head (XLA). No atomics.

Masks are elementwise, as in the query-outer kernel: ragged keys, causality, the sliding window and
document ids per row. Lists are cleaned by `selection.clean_lists` first, so every entry holds a
visible key except where a document boundary and the window leave a block empty for a token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import LN2, LOG2E, Dims
from pallas_kernels.block_sparse.launch import current_tuning, dot_precision, pallas
from pallas_kernels.block_sparse.selection import Selection, clean_lists


@dataclasses.dataclass(frozen=True)
class _Config:
    dims: Dims
    causal: bool
    window: int | None
    scale: float
    interpret: bool
    segmented: bool
    slots: int    # m: list entries per token
    rows: int     # rows a chunk (the MMA M-dimension)
    chunks: int   # chunks a program (its K/V block is loaded once for all of them)

    @property
    def entries(self) -> int:
        return self.dims.seq_q * self.slots

    @property
    def c(self) -> float:  # logits scale in base 2
        return self.scale * LOG2E


# ------------------------------------------------------------------------------------------------
# Lists -> the sorted entries and the program table (XLA).

@dataclasses.dataclass(frozen=True)
class _Table:
    order: jax.Array    # int32 [B, H, E]: entries sorted by (key block, token)
    block: jax.Array    # int32 [B, H, P]: each program's key block (nK: none)
    offset: jax.Array   # int32 [B, H, P]: where that block's entries start in `order`
    row0: jax.Array     # int32 [B, H, P]: the program's first row within the block
    row_end: jax.Array  # int32 [B, H, P]: the block's row count (0 for no block)


jax.tree_util.register_dataclass(_Table, data_fields=["order", "block", "offset", "row0", "row_end"],
                                 meta_fields=[])


def program_count(cfg: _Config) -> int:
    """P: a bound on the programs, sum over blocks of ceil(rows_j / rows_per_program)."""
    per_program = cfg.rows * cfg.chunks
    return -(-cfg.entries * cfg.dims.mask_group // per_program) + cfg.dims.n_k


def _search(sorted_rows, x, side: str):
    """int32 [B, H, len(x)]: `jnp.searchsorted` of x in each sorted row of [B, H, n]."""
    one = lambda row: jnp.searchsorted(row, x, side=side)  # noqa: E731
    return jax.vmap(jax.vmap(one))(sorted_rows).astype(jnp.int32)


def entry_table(lists, cfg: _Config) -> _Table:
    """Cleaned lists int32 [B, H, T, m] (-1 = none) -> the entries in block order and the table of
    programs that cover each key block's rows."""
    d = cfg.dims
    b, h, t, m = lists.shape
    keys = jnp.where(lists >= 0, lists, d.n_k).reshape(b, h, t * m)
    entry = jnp.broadcast_to(jnp.arange(t * m, dtype=jnp.int32), keys.shape)
    keys, order = lax.sort((keys, entry), dimension=2, num_keys=1, is_stable=True)
    starts = _search(keys, jnp.arange(d.n_k + 1, dtype=jnp.int32), "left")              # [B, H, nK + 1]
    block_rows = (starts[..., 1:] - starts[..., :-1]) * d.mask_group
    per_program = cfg.rows * cfg.chunks
    programs = -(-block_rows // per_program)
    last = jnp.cumsum(programs, axis=-1)                                               # inclusive
    p = jnp.arange(program_count(cfg), dtype=jnp.int32)
    block = _search(last, p, "right")                                                  # nK: past the end
    real = block < d.n_k
    safe = jnp.minimum(block, d.n_k - 1)
    at = lambda x: jnp.take_along_axis(x, safe, axis=-1)  # noqa: E731
    row0 = (p - (at(last) - at(programs))) * per_program
    return _Table(order, jnp.where(real, block, d.n_k), jnp.where(real, at(starts[..., :-1]), 0),
                  jnp.where(real, row0, 0), jnp.where(real, at(block_rows), 0))


# ------------------------------------------------------------------------------------------------
# Kernels.

@dataclasses.dataclass(frozen=True)
class _Program:
    """One program's share: its key block, where the block's entries start in `order`, its rows
    [row0, end) of the block, its chunk count, and its selection head's first query head."""
    block: jax.Array
    offset: jax.Array
    row0: jax.Array
    end: jax.Array
    n_chunks: jax.Array
    head0: jax.Array


def _program(block_ref, offset_ref, row0_ref, end_ref, cfg: _Config) -> _Program:
    # Program ids are read here, outside the chunk loop (the interpreter replaces them only at the
    # kernel's top level).
    p = pl.program_id(0)
    row0, end = row0_ref[p], end_ref[p]
    todo = jnp.clip(end - row0, 0, cfg.rows * cfg.chunks)
    return _Program(jnp.minimum(block_ref[p], cfg.dims.n_k - 1), offset_ref[p], row0, end,
                    lax.div(todo + cfg.rows - 1, cfg.rows), pl.program_id(2) * cfg.dims.mask_group)


def _chunk_rows(order_ref, prog: _Program, w, cfg: _Config):
    """Rows of chunk w: (valid [R], entry slot f [R] (E for padding rows), token [R], q head [R])."""
    gs = cfg.dims.mask_group
    v = prog.row0 + w * cfg.rows + jnp.arange(cfg.rows, dtype=jnp.int32)
    valid = v < prog.end
    v = jnp.where(valid, v, prog.row0)
    f = order_ref[jnp.minimum(prog.offset + lax.div(v, gs), cfg.entries - 1)]
    token = lax.div(f, cfg.slots)
    return valid, jnp.where(valid, f, cfg.entries), token, prog.head0 + lax.rem(v, gs)


def _visible(blk, valid, token, qseg_ref, kseg_ref, cfg: _Config):
    """bool [bs, R] (keys x rows): row r sees key blk * bs + c."""
    d = cfg.dims
    cols = (blk * d.block + jnp.arange(d.block))[:, None]
    pos = (token + d.offset)[None, :]
    keep = valid[None, :] & (cols < d.seq_kv)
    if cfg.causal:
        keep = keep & (cols <= pos)
    if cfg.window is not None:
        keep = keep & (cols > pos - cfg.window)
    if cfg.segmented:
        keep = keep & (kseg_ref[pl.ds(pl.multiple_of(blk * d.block, d.block), d.block)][:, None]
                       == qseg_ref[token][None, :])
    return keep


def _fwd_kernel(block_ref, offset_ref, row0_ref, end_ref, order_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, cfg: _Config, precision):
    # Keys x rows orientation, as the backward: every product is a plain, trans_a or trans_b dot.
    prog = _program(block_ref, offset_ref, row0_ref, end_ref, cfg)
    blk = prog.block
    start = pl.multiple_of(blk * cfg.dims.block, cfg.dims.block)
    k, v = k_ref[pl.ds(start, cfg.dims.block), :], v_ref[pl.ds(start, cfg.dims.block), :]

    def chunk(w, carry):   # no state; the carry is passed through (a constant cannot be yielded)
        valid, f, token, head = _chunk_rows(order_ref, prog, w, cfg)
        q = q_ref[token, head, :]
        keep = _visible(blk, valid, token, qseg_ref, kseg_ref, cfg)
        st = jnp.where(keep, pltr.dot(k, q, trans_b=True, precision=precision) * cfg.c, -jnp.inf)
        m = st.max(axis=0)
        pt = jnp.exp2(st - jnp.where(m == -jnp.inf, 0.0, m)[None, :])
        l = pt.sum(axis=0)
        o = pltr.dot(pt.astype(v.dtype), v, trans_a=True, precision=precision)
        empty = l == 0.0
        o_ref[f, head, :] = (o / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
        lse_ref[f, head] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
        return carry

    lax.fori_loop(0, prog.n_chunks, chunk, prog.row0)


def _bwd_kernel(block_ref, offset_ref, row0_ref, end_ref, order_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *, cfg: _Config, precision):
    prog = _program(block_ref, offset_ref, row0_ref, end_ref, cfg)
    blk = prog.block
    start = pl.multiple_of(blk * cfg.dims.block, cfg.dims.block)
    k, v = k_ref[pl.ds(start, cfg.dims.block), :], v_ref[pl.ds(start, cfg.dims.block), :]

    def chunk(w, carry):
        dk, dv = carry
        valid, f, token, head = _chunk_rows(order_ref, prog, w, cfg)
        q, do = q_ref[token, head, :], do_ref[token, head, :]
        lse, delta = lse_ref[token, head], delta_ref[token, head]
        keep = _visible(blk, valid, token, qseg_ref, kseg_ref, cfg)
        st = jnp.where(keep, pltr.dot(k, q, trans_b=True, precision=precision) * cfg.c, -jnp.inf)
        pt = jnp.exp2(st - lse[None, :])
        dv = dv + pltr.dot(pt.astype(do.dtype), do, precision=precision)
        dpt = pltr.dot(v, do, trans_b=True, precision=precision)
        dst = (pt * (dpt - delta[None, :])).astype(q.dtype)
        dk = dk + pltr.dot(dst, q, precision=precision)
        dq_ref[f, head, :] = pltr.dot(dst, k, trans_a=True, precision=precision) * cfg.scale
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, prog.n_chunks, chunk, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. q/do [B, T, N, D_p], k/v [B, S_p, K, D_p]; the whole sequence of a batch
# row is one block (rows are gathered); row statistics [B, T, N].

def _specs(cfg: _Config, table: _Table, dh: int):
    d = cfg.dims
    n_prog, e = table.block.shape[-1], table.order.shape[-1]
    s_p = d.n_k * d.block
    per_program = pl.BlockSpec((None, None, n_prog), lambda p, b, h: (b, h, 0))
    lists = [per_program] * 4 + [pl.BlockSpec((None, None, e), lambda p, b, h: (b, h, 0)),
                                 pl.BlockSpec((None, d.seq_q), lambda p, b, h: (b, 0)),
                                 pl.BlockSpec((None, s_p), lambda p, b, h: (b, 0))]
    kv_head = lambda h: h // (d.mask_heads // d.kv_heads)  # noqa: E731
    q_all = pl.BlockSpec((None, d.seq_q, d.q_heads, dh), lambda p, b, h: (b, 0, 0, 0))
    kv_all = pl.BlockSpec((None, s_p, None, dh), lambda p, b, h: (b, 0, kv_head(h), 0))
    stats = pl.BlockSpec((None, d.seq_q, d.q_heads), lambda p, b, h: (b, 0, 0))
    return lists, q_all, kv_all, stats


def _table_args(table: _Table, ids: common.SegmentIds):
    return (table.block, table.offset, table.row0, table.row_end, table.order, *ids)


def _forward(q, k, v, table: _Table, ids, cfg: _Config):
    d = cfg.dims
    dh = q.shape[-1]
    lists, q_all, kv_all, _ = _specs(cfg, table, dh)
    slots = pl.BlockSpec((None, cfg.entries + 1, d.q_heads, dh), lambda p, b, h: (b, 0, 0, 0))
    slot_stats = pl.BlockSpec((None, cfg.entries + 1, d.q_heads), lambda p, b, h: (b, 0, 0))
    tune = current_tuning(d.block, dh)
    return pallas(
        functools.partial(_fwd_kernel, cfg=cfg, precision=dot_precision(q.dtype)),
        grid=(table.block.shape[-1], d.batch, d.mask_heads),
        in_specs=[*lists, q_all, kv_all, kv_all], out_specs=[slots, slot_stats],
        out_shape=[jax.ShapeDtypeStruct((d.batch, cfg.entries + 1, d.q_heads, dh), q.dtype),
                   jax.ShapeDtypeStruct((d.batch, cfg.entries + 1, d.q_heads), jnp.float32)],
        warps=tune.fwd_warps, stages=tune.fwd_stages, interpret=cfg.interpret,
        name="token_gather_fwd")(*_table_args(table, ids), q, k, v)


def _backward(q, k, v, do, lse2, delta, table: _Table, ids, cfg: _Config):
    d = cfg.dims
    dh = q.shape[-1]
    n_prog = table.block.shape[-1]
    lists, q_all, kv_all, stats = _specs(cfg, table, dh)
    slots = pl.BlockSpec((None, cfg.entries + 1, d.q_heads, dh), lambda p, b, h: (b, 0, 0, 0))
    per_program = pl.BlockSpec((None, None, None, d.block, dh), lambda p, b, h: (b, h, p, 0, 0))
    tune = current_tuning(d.block, dh)
    return pallas(
        functools.partial(_bwd_kernel, cfg=cfg, precision=dot_precision(q.dtype)),
        grid=(n_prog, d.batch, d.mask_heads),
        in_specs=[*lists, q_all, kv_all, kv_all, q_all, stats, stats],
        out_specs=[slots, per_program, per_program],
        out_shape=[jax.ShapeDtypeStruct((d.batch, cfg.entries + 1, d.q_heads, dh), jnp.float32),
                   *[jax.ShapeDtypeStruct((d.batch, d.mask_heads, n_prog, d.block, dh), jnp.float32)] * 2],
        warps=tune.bwd_warps, stages=tune.bwd_stages, interpret=cfg.interpret,
        name="token_gather_bwd")(*_table_args(table, ids), q, k, v, do, lse2, delta)


# ------------------------------------------------------------------------------------------------
# XLA glue: lists, the slot reduce, the per-block sums.

def _slot_valid(lists, cfg: _Config):
    """bool [B, T, m, N]: the slots holding an entry (each selection head's list, per query head)."""
    valid = jnp.moveaxis(lists >= 0, 1, -1)                                  # [B, T, m, H]
    return jnp.repeat(valid, cfg.dims.mask_group, axis=-1)


def merge_slots(o_part, lse_part, valid, cfg: _Config):
    """Each row's slots -> (o f32 [B, T, N, D_p], base-2 LSE [B, T, N], +inf for rows with no key):
    the flash-decoding merge, o = sum_i 2^(lse_i - lse) o_i."""
    d = cfg.dims
    o_part = o_part[:, :cfg.entries].reshape(d.batch, d.seq_q, cfg.slots, d.q_heads, -1)
    lse_part = jnp.where(valid, lse_part[:, :cfg.entries].reshape(valid.shape), -jnp.inf)
    top = lse_part.max(axis=2, keepdims=True)
    weight = jnp.exp2(lse_part - jnp.where(top == -jnp.inf, 0.0, top))
    total = weight.sum(axis=2)
    empty = total == 0.0
    o = jnp.einsum("btin,btind->btnd", weight, jnp.where(valid[..., None], o_part, 0).astype(jnp.float32))
    o = o / jnp.where(empty, 1.0, total)[..., None]
    return o, jnp.where(empty, jnp.inf, top[:, :, 0] + jnp.log2(jnp.where(empty, 1.0, total)))


def _block_sums(part, table: _Table, cfg: _Config, dtype):
    """Per-program dK or dV [B, H, P, bs, D_p] -> [B, S_p, K, D_p]: summed per key block, then over
    the selection heads of each kv head."""
    d = cfg.dims
    sums = jax.vmap(jax.vmap(lambda x, seg: jax.ops.segment_sum(x, seg, num_segments=d.n_k + 1)))(
        part, table.block)[:, :, :d.n_k]                                     # [B, H, nK, bs, D_p]
    per_kv = d.mask_heads // d.kv_heads
    sums = sums.reshape(d.batch, d.kv_heads, per_kv, d.n_k * d.block, -1).sum(2)
    return jnp.swapaxes(sums, 1, 2).astype(dtype)


def _prepared(q, k, v, indices, counts, seg, cfg: _Config):
    d = cfg.dims
    dh = common.padded_head_dim(d.head_dim)
    lists = clean_lists(Selection(indices, counts, d.n_k, granularity="token"),
                        seg if cfg.segmented else None, d, cfg.causal, cfg.window)
    s_p = d.n_k * d.block
    kp, vp = (common.pad_axis(common.pad_axis(x, 1, s_p), 3, dh) for x in (k, v))
    ids = common.SegmentIds(seg.q, jnp.pad(seg.kv, ((0, 0), (0, s_p - d.seq_kv)), mode="edge"))
    return lists, common.pad_axis(q, 3, dh), kp, vp, ids, entry_table(lists, cfg)


def _fwd_impl(q, k, v, indices, counts, seg, cfg: _Config):
    lists, qp, kp, vp, ids, table = _prepared(q, k, v, indices, counts, seg, cfg)
    o_part, lse_part = _forward(qp, kp, vp, table, ids, cfg)
    o, lse2 = merge_slots(o_part, lse_part, _slot_valid(lists, cfg), cfg)
    o = o[..., :cfg.dims.head_dim].astype(q.dtype)
    lse = jnp.swapaxes(jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * LN2), 1, 2)
    return o, lse, lse2


def _attention_bwd(cfg: _Config, res, cotangents):
    q, k, v, indices, counts, seg, o, lse2 = res
    do, dlse = cotangents
    d = cfg.dims
    lists, qp, kp, vp, ids, table = _prepared(q, k, v, indices, counts, seg, cfg)
    # d(lse)/d(s) = p, so an LSE cotangent enters exactly like -delta: ds = p * (dp - delta + dlse).
    delta = jnp.einsum("btnd,btnd->btn", o.astype(jnp.float32), do.astype(jnp.float32)) - jnp.swapaxes(dlse, 1, 2)
    dq_part, dk, dv = _backward(qp, kp, vp, common.pad_axis(do.astype(q.dtype), 3, qp.shape[-1]), lse2, delta,
                                table, ids, cfg)
    valid = _slot_valid(lists, cfg)[..., None]
    dq_part = dq_part[:, :cfg.entries].reshape(d.batch, d.seq_q, cfg.slots, d.q_heads, -1)
    dq = jnp.where(valid, dq_part, 0.0).sum(2)[..., :d.head_dim].astype(q.dtype)
    cut = lambda x: _block_sums(x, table, cfg, k.dtype)[:, :d.seq_kv, :, :d.head_dim]  # noqa: E731
    return dq, cut(dk), cut(dv), None, None, None


_attention = common.token_lists_vjp(_fwd_impl, _attention_bwd)


def gather_token_attention(q, k, v, selection: Selection, seg, dims: Dims, *, causal: bool, scale: float,
                           window: int | None, interpret: bool):
    """(o [B, T, N, D], natural LSE f32 [B, N, T]) of a validated token-level call (see
    `token_kernel.token_block_sparse_attention`) in key-block-outer order."""
    tune = current_tuning(dims.block, dims.head_dim)
    cfg = _Config(dims, causal, window, scale, interpret, segmented=seg is not None,
                  slots=selection.indices.shape[-1], rows=tune.gather_rows, chunks=tune.gather_chunks)
    if seg is None:  # unread placeholders keep one kernel signature
        seg = common.SegmentIds(jnp.zeros((dims.batch, dims.seq_q), jnp.int32),
                                jnp.zeros((dims.batch, dims.seq_kv), jnp.int32))
    return _attention(q, k, v, selection.indices, selection.counts, seg, cfg)
