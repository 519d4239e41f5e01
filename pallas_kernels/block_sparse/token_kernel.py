"""Block-sparse attention with per-token selection (NSA / InfLLM-V2 layout), Pallas Triton lowering.

Each query token has its own sorted list of key blocks, shared by the `Gs = N // H` query heads
of its selection head (H = K: one list per GQA group; H = N: one per query head). A tile's rows
are those Gs heads at P consecutive tokens, `R = P * Gs` rows, row r = (token r // Gs, head
r % Gs). P = max(1, token_rows // Gs) with `Tuning.token_rows` = 16 by default, so the MMA
M-dimension is at least 16 even for small groups; the P tokens loop over the union of their lists
and each row masks the blocks its own token did not select (the per-row mask, compared against
the token's list in registers).

  forward, dq  grid (nG, B, H), nG = ceil(T / P) token groups: loop over the group's union list.
  dk/dv        grid (nK * C, B, H): one key block, loop over (a C-th of) the token groups whose
               union holds it. That transposed map is a CSR (per key block an offset into one flat
               array of token groups), built with one sort of (block, group) keys; no atomics.
               C > 1 only when nK * B * H programs would leave the GPU idle (G = 16, K = 1): the
               C partial dk/dv are then summed in f32 in XLA. Otherwise dk/dv are written once
               per (key block, selection head), in k's dtype when H = K.

Every step applies the elementwise mask (membership, causality and sliding window per token,
ragged keys, document ids): with token-level lists the tiles have no static full/masked classes.

Lists are cleaned before the kernels: entries past `counts`, blocks after the token (causal),
blocks ending before its window and blocks holding none of the token's document are dropped, so
every loop step does useful work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.block_sparse import common, flash
from pallas_kernels.block_sparse.common import LN2, LOG2E, Dims
from pallas_kernels.block_sparse.launch import current_tuning, dot_precision, pallas
from pallas_kernels.block_sparse.selection import Selection, clean_lists, token_attention_dims
from pallas_kernels.block_sparse.token_gather_kernel import gather_token_attention

MAX_HEAD_DIM = 256
# dk/dv grid target: enough programs to fill an H100's 132 SMs several times over.
DKV_PROGRAMS = 2048
MAX_DKV_CHUNKS = 16


def tokens_per_tile(dims: Dims) -> int:
    """P: consecutive tokens per tile, so that a tile has at least `Tuning.token_rows` rows (16 by
    default, the tensor-core MMA M-dimension)."""
    rows = current_tuning(dims.block, dims.head_dim).token_rows
    return max(1, rows // dims.mask_group)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_token_kernel(dims: Dims) -> None:
    """ValueErrors for shapes the Triton token kernel cannot tile."""
    gs = dims.mask_group
    if gs & (gs - 1):
        raise ValueError(f"query heads per selection head = {gs} (N={dims.q_heads}, H={dims.mask_heads}) "
                         f"must be a power of two for the query-outer token kernel (Tuning.token_order="
                         f"'query'); the key-block-outer order ('key', or 'auto') runs any group")


# ------------------------------------------------------------------------------------------------
# Lists (jnp, outside the kernels).

def union_lists(lists, p: int, n_k: int):
    """Per group of p tokens, the sorted union of their lists: [B, H, nG, p*m] (-1 padded), and
    its length [B, H, nG, 1]."""
    b, h, t_p, m = lists.shape
    flat = jnp.where(lists < 0, n_k, lists).reshape(b, h, t_p // p, p * m)
    flat = jnp.sort(flat, axis=-1)
    if p > 1:  # drop repeats, then move them to the end
        repeat = jnp.concatenate([jnp.zeros_like(flat[..., :1], bool), flat[..., 1:] == flat[..., :-1]], -1)
        flat = jnp.sort(jnp.where(repeat, n_k, flat), axis=-1)
    count = (flat < n_k).sum(-1, keepdims=True, dtype=jnp.int32)
    return jnp.where(flat < n_k, flat, -1), count


def transposed_groups(union, n_k: int):
    """CSR of the transposed map: for each key block, the token groups whose union holds it.

    Returns groups int32 [B, H, nG * U] (sorted by block, then group) and offsets int32
    [B, H, nK + 1]: block j's groups are groups[offsets[j]:offsets[j + 1]].
    """
    b, h, n_g, u = union.shape
    key = jnp.where(union >= 0, union * n_g + jnp.arange(n_g, dtype=jnp.int32)[:, None], n_k * n_g)
    key = jnp.sort(key.reshape(b, h, n_g * u), axis=-1)
    bounds = jnp.arange(n_k + 1, dtype=jnp.int32) * n_g
    offsets = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, bounds)))(key).astype(jnp.int32)
    return key % n_g, offsets


# ------------------------------------------------------------------------------------------------
# Kernel pieces.

@dataclasses.dataclass(frozen=True)
class _Config:
    dims: Dims
    causal: bool
    window: int | None  # from `common.check_window`: None when it hides nothing
    scale: float
    interpret: bool
    segmented: bool
    p: int  # tokens per tile
    dkv_chunks: int = 1  # programs sharing one key block's token groups in dk/dv

    @property
    def rows(self) -> int:
        return self.p * self.dims.mask_group

    @property
    def c(self) -> float:  # logits scale in base 2
        return self.scale * LOG2E


def _per_row(x, gs: int):
    """[P] per token -> [P * gs] per row (row r belongs to token r // gs)."""
    return jnp.broadcast_to(x[:, None], (x.shape[0], gs)).reshape(x.shape[0] * gs)


def _visible(blk, lists, pos, qid, kseg, cfg: _Config, *, transposed: bool):
    """bool [R, bs] ([bs, R] transposed), or broadcastable to it: row r sees key blk*bs + c when
    its token selected blk, the key is real, at or before the token (causal), inside its window
    and in the token's document."""
    d = cfg.dims
    cols = blk * d.block + jnp.arange(d.block)

    def outer(row_vec, col_vec):  # both vectors laid out along their axis of the tile
        return (row_vec[None, :], col_vec[:, None]) if transposed else (row_vec[:, None], col_vec[None, :])

    row_pos, col = outer(pos, cols)
    keep = col < d.seq_kv
    if cfg.causal:
        keep = keep & (col <= row_pos)
    if cfg.window is not None:
        keep = keep & (col > row_pos - cfg.window)
    if cfg.p > 1:  # the union holds blocks that only some of the P tokens selected
        member = _per_row(jnp.max((lists == blk).astype(jnp.int32), axis=1) > 0, d.mask_group)
        keep = keep & outer(member, cols)[0]
    if cfg.segmented:
        row_id, col_id = outer(qid, kseg)
        keep = keep & (row_id == col_id)
    return keep


def _positions(g, cfg: _Config):
    """Absolute positions [R] of the rows of token group g."""
    return g * cfg.p + jnp.arange(cfg.rows) // cfg.dims.mask_group + cfg.dims.offset


def _group_logits(q_ref, lists_ref, qseg_ref, kseg_ref, k_ref, cfg: _Config, precision):
    """This program's token group: q rows [R, D] and `logits(blk) -> (start, s)`, the masked
    base-2 logits s [R, bs] of the rows against key block blk starting at key `start`."""
    bs = cfg.dims.block
    q = q_ref[...].reshape(cfg.rows, q_ref.shape[-1])
    pos = _positions(pl.program_id(0), cfg)
    lists = lists_ref[...]
    qid = _per_row(qseg_ref[...], cfg.dims.mask_group) if cfg.segmented else None

    def logits(blk):
        start = pl.multiple_of(blk * bs, bs)
        s = pltr.dot(q, k_ref[pl.ds(start, bs), :], trans_b=True, precision=precision) * cfg.c
        kseg = kseg_ref[pl.ds(start, bs)] if cfg.segmented else None
        return start, jnp.where(_visible(blk, lists, pos, qid, kseg, cfg, transposed=False), s, -jnp.inf)
    return q, logits


def _fwd_kernel(union_ref, ucnt_ref, lists_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref,
                lse_ref, *, cfg: _Config, precision):
    q, logits = _group_logits(q_ref, lists_ref, qseg_ref, kseg_ref, k_ref, cfg, precision)

    def step(t, carry):
        start, s = logits(union_ref[t])
        return flash.softmax_update(carry, s, v_ref[pl.ds(start, cfg.dims.block), :], may_be_empty=True,
                                    precision=precision)

    carry = lax.fori_loop(0, ucnt_ref[0], step, flash.softmax_init(cfg.rows, q.shape[-1]))
    o, lse = flash.softmax_finish(*carry)
    lse_ref[...] = lse
    o_ref[...] = o.reshape(o_ref.shape).astype(o_ref.dtype)


def _dq_kernel(union_ref, ucnt_ref, lists_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, cfg: _Config, precision):
    bs = cfg.dims.block
    q, logits = _group_logits(q_ref, lists_ref, qseg_ref, kseg_ref, k_ref, cfg, precision)
    do = do_ref[...].reshape(cfg.rows, do_ref.shape[-1])
    lse, delta = lse_ref[...], delta_ref[...]

    def step(t, dq):
        start, s = logits(union_ref[t])
        k = k_ref[pl.ds(start, bs), :]
        v = v_ref[pl.ds(start, bs), :]
        p = jnp.exp2(s - lse[:, None])
        dp = pltr.dot(do, v, trans_b=True, precision=precision)
        return dq + pltr.dot((p * (dp - delta[:, None])).astype(k.dtype), k, precision=precision)

    dq = lax.fori_loop(0, ucnt_ref[0], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(groups_ref, off_ref, lists_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config, precision):
    # Transposed tiles (keys x rows) so that every product is a plain or trans_b dot.
    p, r = cfg.p, cfg.rows
    # lax.div / lax.rem: the operands are never negative, so no floor-division sign fix-up.
    j, chunk = lax.div(pl.program_id(0), cfg.dkv_chunks), lax.rem(pl.program_id(0), cfg.dkv_chunks)
    k, v = k_ref[...], v_ref[...]
    dh = k.shape[-1]
    kseg = kseg_ref[...] if cfg.segmented else None

    def step(t, carry):
        dk, dv = carry
        g = groups_ref[t]
        tok = pl.ds(pl.multiple_of(g * p, p), p)
        rows = pl.ds(pl.multiple_of(g * r, r), r)
        q = q_ref[tok, :, :].reshape(r, dh)
        do = do_ref[tok, :, :].reshape(r, dh)
        lse, delta = lse_ref[rows], delta_ref[rows]
        qid = _per_row(qseg_ref[tok], cfg.dims.mask_group) if cfg.segmented else None
        keep = _visible(j, lists_ref[tok, :], _positions(g, cfg), qid, kseg, cfg, transposed=True)
        st = jnp.where(keep, pltr.dot(k, q, trans_b=True, precision=precision) * cfg.c, -jnp.inf)
        pt = jnp.exp2(st - lse[None, :])
        dv = dv + pltr.dot(pt.astype(do.dtype), do, precision=precision)
        dpt = pltr.dot(v, do, trans_b=True, precision=precision)
        dk = dk + pltr.dot((pt * (dpt - delta[None, :])).astype(q.dtype), q, precision=precision)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    lo, hi = off_ref[j], off_ref[j + 1]
    per_chunk = lax.div(hi - lo + cfg.dkv_chunks - 1, cfg.dkv_chunks)
    first = lo + chunk * per_chunk
    dk, dv = lax.fori_loop(first, jnp.minimum(hi, first + per_chunk), step, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Padded arrays: q/do/o [B, T_p, H, Gs, D_p] (T_p = nG * P), k/v
# [B, S_p, K, D_p], row statistics [B, H, T_p * Gs] (row = token * Gs + head in the group).

@dataclasses.dataclass(frozen=True)
class _Lists:
    union: jax.Array   # [B, H, nG, U]
    ucount: jax.Array  # [B, H, nG, 1]
    tokens: jax.Array  # [B, H, T_p, Mp], each token's cleaned list (for the per-row mask)
    ids: common.SegmentIds  # padded document ids (zeros, unread, without segment ids)


def _kv_head(h, d: Dims):
    return h // (d.mask_heads // d.kv_heads)


def _group_specs(cfg: _Config, lists: _Lists, dh: int):
    """BlockSpecs of the (token group, batch, selection head) grid: lists, ids, q rows, whole K/V."""
    d, p = cfg.dims, cfg.p
    u, mp = lists.union.shape[-1], lists.tokens.shape[-1]
    s_p = d.n_k * d.block
    lists_specs = [pl.BlockSpec((None, None, None, u), lambda g, b, h: (b, h, g, 0)),
                   pl.BlockSpec((None, None, None, 1), lambda g, b, h: (b, h, g, 0)),
                   pl.BlockSpec((None, None, p, mp), lambda g, b, h: (b, h, g, 0)),
                   pl.BlockSpec((None, p), lambda g, b, h: (b, g)),
                   pl.BlockSpec((None, s_p), lambda g, b, h: (b, 0))]
    q_rows = pl.BlockSpec((None, p, None, d.mask_group, dh), lambda g, b, h: (b, g, h, 0, 0))
    kv_all = pl.BlockSpec((None, s_p, None, dh), lambda g, b, h: (b, 0, _kv_head(h, d), 0))
    row_vec = pl.BlockSpec((None, None, cfg.rows), lambda g, b, h: (b, h, g))
    return lists_specs, q_rows, kv_all, row_vec


def _forward(q, k, v, lists: _Lists, cfg: _Config):
    b, t_p, h, gs, dh = q.shape
    lists_specs, q_rows, kv_all, row_vec = _group_specs(cfg, lists, dh)
    tune = current_tuning(cfg.rows, dh)
    return pallas(
        functools.partial(_fwd_kernel, cfg=cfg, precision=dot_precision(q.dtype)),
        grid=(t_p // cfg.p, b, h),
        in_specs=[*lists_specs, q_rows, kv_all, kv_all],
        out_specs=[q_rows, row_vec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t_p * gs), jnp.float32)],
        warps=tune.fwd_warps, stages=tune.fwd_stages, interpret=cfg.interpret,
        name="token_sparse_fwd")(lists.union, lists.ucount, lists.tokens, *lists.ids, q, k, v)


def _backward(q, k, v, do, lse, delta, lists: _Lists, cfg: _Config):
    d, bs = cfg.dims, cfg.dims.block
    b, t_p, h, gs, dh = q.shape
    s_p = k.shape[1]
    tune = current_tuning(cfg.rows, dh)
    precision = dot_precision(q.dtype)
    lists_specs, q_rows, kv_all, row_vec = _group_specs(cfg, lists, dh)
    dq = pallas(
        functools.partial(_dq_kernel, cfg=cfg, precision=precision),
        grid=(t_p // cfg.p, b, h),
        in_specs=[*lists_specs, q_rows, kv_all, kv_all, q_rows, row_vec, row_vec],
        out_specs=q_rows, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        warps=tune.bwd_warps, stages=tune.bwd_stages, interpret=cfg.interpret,
        name="token_sparse_dq")(lists.union, lists.ucount, lists.tokens, *lists.ids, q, k, v, do, lse, delta)

    groups, offsets = transposed_groups(lists.union, d.n_k)
    mp = lists.tokens.shape[-1]
    # With few (key block, selection head) programs (G = 16 puts every head of a kv head in one
    # program), each key block's token groups are split over `chunks` programs whose partial
    # dk/dv are summed below: the grid reaches DKV_PROGRAMS programs at most.
    chunks = max(1, min(MAX_DKV_CHUNKS, DKV_PROGRAMS // (d.n_k * b * h)))
    cfg = dataclasses.replace(cfg, dkv_chunks=chunks)
    blk = lambda i: lax.div(i, chunks)  # noqa: E731  (grid index -> key block)
    kv_tile = pl.BlockSpec((None, bs, None, dh), lambda i, b, h: (b, blk(i), _kv_head(h, d), 0))
    q_all = pl.BlockSpec((None, t_p, None, gs, dh), lambda i, b, h: (b, 0, h, 0, 0))
    row_all = pl.BlockSpec((None, None, t_p * gs), lambda i, b, h: (b, h, 0))
    dkv_tile = pl.BlockSpec((None, None, bs, None, dh), lambda i, b, h: (b, lax.rem(i, chunks), blk(i), h, 0))
    # One selection head per kv head and one chunk: written in k's dtype; else f32, summed below.
    heads_per_kv = d.mask_heads // d.kv_heads
    dkv_dtype = k.dtype if heads_per_kv == 1 and chunks == 1 else jnp.float32
    dk, dv = pallas(
        functools.partial(_dkv_kernel, cfg=cfg, precision=precision),
        grid=(d.n_k * chunks, b, h),
        in_specs=[pl.BlockSpec((None, None, groups.shape[-1]), lambda i, b, h: (b, h, 0)),
                  pl.BlockSpec((None, None, d.n_k + 1), lambda i, b, h: (b, h, 0)),
                  pl.BlockSpec((None, None, t_p, mp), lambda i, b, h: (b, h, 0, 0)),
                  pl.BlockSpec((None, t_p), lambda i, b, h: (b, 0)),
                  pl.BlockSpec((None, bs), lambda i, b, h: (b, blk(i))),
                  q_all, kv_tile, kv_tile, q_all, row_all, row_all],
        out_specs=[dkv_tile, dkv_tile],
        out_shape=[jax.ShapeDtypeStruct((b, chunks, s_p, h, dh), dkv_dtype)] * 2,
        warps=tune.bwd_warps, stages=tune.bwd_stages, interpret=cfg.interpret,
        name="token_sparse_dkv")(groups, offsets, lists.tokens, *lists.ids, q, k, v, do, lse, delta)
    dk, dv = (x.sum(1).reshape(b, s_p, d.kv_heads, heads_per_kv, dh).sum(3).astype(k.dtype)
              for x in (dk, dv))
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# custom_vjp glue: layouts, padding, lists.

def _rows_layout(x, cfg: _Config, dh: int):
    """[B, T, N, D] -> [B, T_p, H, Gs, D_p] (zero padded; a free reshape when no padding)."""
    d = cfg.dims
    t_p = -(-d.seq_q // cfg.p) * cfg.p
    x = common.pad_axis(common.pad_axis(x, 1, t_p), 3, dh)
    return x.reshape(d.batch, t_p, d.mask_heads, d.mask_group, dh)


def _stats_layout(x, cfg: _Config):
    """[B, N, T] -> [B, H, T_p * Gs] (row = token * Gs + head in the group)."""
    d = cfg.dims
    t_p = -(-d.seq_q // cfg.p) * cfg.p
    x = common.pad_axis(x, 2, t_p).reshape(d.batch, d.mask_heads, d.mask_group, t_p)
    return jnp.swapaxes(x, 2, 3).reshape(d.batch, d.mask_heads, t_p * d.mask_group)


def _stats_unlayout(x, cfg: _Config):
    """Inverse of `_stats_layout`, cut to [B, N, T]."""
    d = cfg.dims
    x = x.reshape(d.batch, d.mask_heads, -1, d.mask_group)
    return jnp.swapaxes(x, 2, 3).reshape(d.batch, d.q_heads, -1)[..., :d.seq_q]


def _build_lists(indices, counts, seg, cfg: _Config) -> _Lists:
    d = cfg.dims
    t_p = -(-d.seq_q // cfg.p) * cfg.p
    sel = Selection(indices, counts, d.n_k, granularity="token")
    tokens = clean_lists(sel, seg if cfg.segmented else None, d, cfg.causal, cfg.window)
    mp = _pow2(tokens.shape[-1])  # Triton loads need power-of-two tiles
    tokens = jnp.pad(tokens, ((0, 0), (0, 0), (0, t_p - d.seq_q), (0, mp - tokens.shape[-1])),
                     constant_values=-1)
    union, ucount = union_lists(tokens, cfg.p, d.n_k)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), mode="edge")  # noqa: E731
    ids = common.SegmentIds(pad(seg.q, t_p), pad(seg.kv, d.n_k * d.block))
    return _Lists(union, ucount, tokens, ids)


def _fwd_impl(q, k, v, indices, counts, seg, cfg: _Config):
    d = cfg.dims
    dh = common.padded_head_dim(d.head_dim)
    lists = _build_lists(indices, counts, seg, cfg)
    kp, vp = (common.pad_axis(common.pad_axis(x, 1, d.n_k * d.block), 3, dh) for x in (k, v))
    o, lse2 = _forward(_rows_layout(q, cfg, dh), kp, vp, lists, cfg)
    o = o.reshape(d.batch, -1, d.q_heads, dh)[:, :d.seq_q, :, :d.head_dim]
    lse = _stats_unlayout(jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * LN2), cfg)
    return o, lse, lse2


def _attention_bwd(cfg: _Config, res, cotangents):
    q, k, v, indices, counts, seg, o, lse2 = res
    do, dlse = cotangents
    d = cfg.dims
    dh = common.padded_head_dim(d.head_dim)
    lists = _build_lists(indices, counts, seg, cfg)
    # d(lse)/d(s) = p, so an LSE cotangent enters exactly like -delta: ds = p * (dp - delta + dlse).
    delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    kp, vp = (common.pad_axis(common.pad_axis(x, 1, d.n_k * d.block), 3, dh) for x in (k, v))
    dq, dk, dv = _backward(_rows_layout(q, cfg, dh), kp, vp, _rows_layout(do.astype(q.dtype), cfg, dh),
                           lse2, _stats_layout(delta, cfg), lists, cfg)
    dq = dq.reshape(d.batch, -1, d.q_heads, dh)[:, :d.seq_q, :, :d.head_dim]
    cut = lambda x: x[:, :d.seq_kv, :, :d.head_dim]  # noqa: E731
    return dq, cut(dk), cut(dv), None, None, None


_attention = common.token_lists_vjp(_fwd_impl, _attention_bwd)


def loop_order(dims: Dims) -> str:
    """"query" (this file) or "key" (`token_gather_kernel`) for a token-level call: `Tuning.token_order`,
    or with "auto" the query-outer order wherever it can tile the group (Gs a power of two) and the
    key-block-outer order elsewhere (Gs = 3, 6, ..., which only it runs). A default on the hot path
    moves only with a GPU measurement showing it no slower (docs/benchmarks.md)."""
    order = current_tuning(dims.block, dims.head_dim).token_order
    if order not in ("auto", "query", "key"):
        raise ValueError(f"Tuning.token_order={order!r}; choose one of 'auto', 'query', 'key'")
    if order == "auto":
        gs = dims.mask_group
        return "query" if gs & (gs - 1) == 0 else "key"
    return order


def token_block_sparse_attention(q, k, v, selection: Selection, *, causal: bool, block_size: int,
                                 sm_scale, segment_ids, window, interpret: bool, return_lse: bool):
    """`kernel.block_sparse_attention` for a token-level `Selection` (validated here); the
    arguments and results are that function's. The loop order is `loop_order`'s."""
    dims = token_attention_dims(q, k, v, selection, block_size)
    seg = common.segment_ids_pair(segment_ids, dims)
    causal, scale = bool(causal), common.default_scale(sm_scale, dims.head_dim)
    window = common.check_window(window, causal, dims.seq_kv)
    if dims.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={dims.head_dim} exceeds the token-level Triton kernels' {MAX_HEAD_DIM}")
    if loop_order(dims) == "key":
        o, lse = gather_token_attention(q, k, v, selection, seg, dims, causal=causal, scale=scale,
                                        window=window, interpret=bool(interpret))
        return (o, lse) if return_lse else o
    check_token_kernel(dims)
    cfg = _Config(dims, causal, window, scale, bool(interpret), segmented=seg is not None, p=tokens_per_tile(dims))
    if seg is None:  # unread placeholders keep one kernel signature
        seg = common.SegmentIds(jnp.zeros((dims.batch, dims.seq_q), jnp.int32),
                                jnp.zeros((dims.batch, dims.seq_kv), jnp.int32))
    o, lse = _attention(q, k, v, selection.indices, selection.counts, seg, cfg)
    return (o, lse) if return_lse else o
