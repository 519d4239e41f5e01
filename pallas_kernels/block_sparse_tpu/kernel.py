"""Block-sparse flash attention on Pallas Mosaic TPU: forward, dq and dk/dv kernels.

Same arguments, shapes and semantics as `pallas_kernels.block_sparse.reference`; FlashAttention-2
restricted to the selected (query block, key block) tiles of a bool block mask.

Why a grid over list slots. A TPU kernel is a sequential grid whose BlockSpecs tell the pipeline
which tiles to DMA into VMEM one step ahead; the trip count of a grid axis is static, and the
index_map may read only scalar-prefetched (SMEM) arrays. So each kernel walks an index list:

  forward, dq  grid (B, N, nQ, nK): step (b, h, i, t) handles slot t of row i's list of selected
               key blocks (`data`, ascending). The K/V index_map reads `data[b, h', i, t]`; slots
               past the row's count hold the row's last valid block again, so the pipeline sees an
               unchanged block index and issues no DMA, and `pl.when(t < count)` skips the compute.
               Online-softmax state (m, l, acc) or dq lives in VMEM scratch from t = 0 to t = nK-1.
  dk/dv        grid (B, K, nK, G, nQ): step (b, kv head, j, g, t) handles slot t of the transposed
               list (query blocks that selected key block j) of query head kv*G + g. The group
               axis sits inside, so dk/dv of one kv head accumulate in VMEM over all G query heads
               and are written once, in k's dtype (no per-query-head f32 copies).

Lists are built with `common.mask_to_indices` (cumsum + scatter) after dropping the tiles with no
visible pair (`common.tile_classes`), flattened to 1-D int32 (2-D SMEM arrays pad their minor
dimension) and passed with `pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2)`. Whether a tile
needs the elementwise mask (causal diagonal, ragged last key block) is recomputed from the two
block indices with scalar arithmetic, and two `pl.when` branches keep `where` off the full tiles.

TPU layout: q/k/v are moved to head-major [B, heads, L, D] so that tiles are (block, D) with
block a multiple of 8 sublanes and D of 128 lanes. block_size must be 128, 256 or 512; head_dim
is zero-padded to a multiple of 128 (zero columns change no dot product; padded outputs are cut).
Row statistics follow splash attention: m and l are (block, 128) lane-replicated scratch, and the
LSE / delta residuals are [B, N, 1, T] rows (read as a column in dq, as a row in dk/dv).

Segment ids: tiles between documents are dropped from the lists; with ids every remaining tile
takes the masked branch, which also compares row ids (lane-replicated (bs, 128) blocks) with
column ids (sublane-replicated (8, bs) blocks), as splash attention lays them out.

`interpret=True` runs the TPU interpreter (`pltpu.InterpretParams()`, CPU); an InterpretParams
instance is passed through. The grid is as long as a dense one (nK slots per row); skipped slots
cost a grid step but neither DMA nor MXU work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import Dims
from pallas_kernels.block_sparse.selection import Selection

BLOCK_SIZES = (128, 256, 512)
LANES = 128
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


# ------------------------------------------------------------------------------------------------
# Validation and static configuration.

def check_block_size(block_size) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} is not supported on TPU; choose one of {BLOCK_SIZES} "
                         f"(Mosaic tiles are whole multiples of 128 lanes)")


def attention_dims(q, k, v, block_mask, block_size: int) -> Dims:
    """`common.attention_dims` with the TPU block sizes (ValueError naming the argument)."""
    check_block_size(block_size)
    return common.attention_dims(q, k, v, block_mask, block_size, block_sizes=BLOCK_SIZES)


def padded_head_dim(head_dim: int) -> int:
    """Lane-dense tiles: head_dim is zero-padded to a multiple of 128."""
    return -(-head_dim // LANES) * LANES


def interpret_params(interpret):
    """False (compiled Mosaic), or the TPU interpreter's parameters for `pl.pallas_call`."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


@dataclasses.dataclass(frozen=True)
class _Config:
    dims: Dims
    causal: bool
    scale: float
    interpret: object  # False or pltpu.InterpretParams (hashable)
    segmented: bool = False  # segment ids given: two id refs follow each kernel's other inputs


# ------------------------------------------------------------------------------------------------
# Shared pieces of the kernel bodies.

def _dot(a, b, dims, dtype):
    # f32 inputs: full-precision products (the default may use bf16 passes); f32 accumulation.
    precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _div(x, c: int):
    # lax.div: jnp's floor division of signed ints lowers through `sign`, which Mosaic only
    # lowers when it knows the TPU generation; indices here are never negative.
    return x if c == 1 else lax.div(x, c)


def _is_full(qb, kb, cfg: _Config):
    """Scalar: every key of tile (qb, kb) is real and visible to every query row of it. With
    segment ids every tile takes the masked branch (document-uniform tiles are not told apart)."""
    d, bs = cfg.dims, cfg.dims.block
    if cfg.segmented:
        return False
    full = (kb + 1) * bs <= d.seq_kv
    if cfg.causal:
        full = jnp.logical_and(full, (kb + 1) * bs - 1 <= qb * bs + d.offset)
    return full


def _visible(q_pos, k_pos, cfg: _Config):
    keep = k_pos < cfg.dims.seq_kv
    if cfg.causal:
        keep = jnp.logical_and(keep, k_pos <= q_pos + cfg.dims.offset)
    return keep


def _doc_refs(refs, cfg: _Config):
    """((row-side ids ref, column-side ids ref), the other refs): with segment ids the kernels take
    the two id refs right after their other inputs."""
    return (tuple(refs[:2]), refs[2:]) if cfg.segmented else ((None, None), refs)


def _same_doc(col_ids_ref, row_ids_ref, width: int):
    """bool (bs, width): the id of each tile row (a lane-replicated (bs, 128) block) equals the id
    of each tile column (a sublane-replicated (8, width) block), splash attention's layout."""
    return _lanes(col_ids_ref[...], width) == row_ids_ref[:1, :]


def _masked(s, keep, docs, width: int):
    """s with -inf outside `keep` and (segment ids) outside the row's document."""
    if docs[0] is not None:
        keep = jnp.logical_and(keep, _same_doc(*docs, width))
    return jnp.where(keep, s, -jnp.inf)


def _branches(run, full, body):
    """body(masked) under pl.when, with the elementwise mask only where the tile needs it."""
    pl.when(jnp.logical_and(run, full))(functools.partial(body, False))
    pl.when(jnp.logical_and(run, jnp.logical_not(full)))(functools.partial(body, True))


def _lanes(x, width: int):
    """(rows, 128) lane-replicated statistic -> (rows, width), width a multiple of 128."""
    return x if width == LANES else jnp.tile(x, (1, width // LANES))


# ------------------------------------------------------------------------------------------------
# Kernels. Refs: 1-D SMEM lists, then the VMEM tiles of the BlockSpecs, then scratch.

def _fwd_kernel(data_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
    docs, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _doc_refs(refs, cfg)
    d, bs = cfg.dims, cfg.dims.block
    b, h, qi, t = (pl.program_id(a) for a in range(4))
    row = (b * d.mask_heads + _div(h, d.mask_group)) * d.n_q + qi
    kb = data_ref[row * d.n_k + t]

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def body(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, _NT, q.dtype) * cfg.scale
        if masked:
            q_pos = qi * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
            k_pos = kb * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
            s = _masked(s, _visible(q_pos, k_pos, cfg), docs, bs)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # (bs, 128)
        # A row that has seen only hidden keys keeps m = -inf: subtract 0 so exp gives 0, not NaN.
        m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp(s - _lanes(m_sub, bs))
        alpha = jnp.exp(m_prev - m_sub)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        m_sc[...] = m_new
        acc_sc[...] = (_lanes(alpha, acc_sc.shape[1]) * acc_sc[...]
                       + _dot(p.astype(v.dtype), v, _NN, v.dtype))

    _branches(t < cnt_ref[row], _is_full(qi, kb, cfg), body)

    @pl.when(t == d.n_k - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0  # no visible key: output 0, internal LSE +inf (so the backward's p is 0)
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / _lanes(l_safe, acc_sc.shape[1])).astype(o_ref.dtype)
        lse = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(l_safe))  # (bs, 128), lanes equal
        lse_ref[...] = lse.T[:1, :]  # a (1, bs) row


def _dq_kernel(data_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    docs, (dq_ref, dq_sc) = _doc_refs(refs, cfg)
    d, bs = cfg.dims, cfg.dims.block
    b, h, qi, t = (pl.program_id(a) for a in range(4))
    row = (b * d.mask_heads + _div(h, d.mask_group)) * d.n_q + qi
    kb = data_ref[row * d.n_k + t]

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def body(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, _NT, q.dtype) * cfg.scale
        if masked:
            q_pos = qi * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
            k_pos = kb * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
            s = _masked(s, _visible(q_pos, k_pos, cfg), docs, bs)
        p = jnp.exp(s - lse_ref[0][:, None])
        dp = _dot(do, v, _NT, v.dtype)
        ds = p * (dp - delta_ref[0][:, None])
        dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN, k.dtype)

    _branches(t < cnt_ref[row], _is_full(qi, kb, cfg), body)

    @pl.when(t == d.n_k - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(data_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    # Transposed tiles (keys x queries): the row statistics broadcast along sublanes.
    docs, (dk_ref, dv_ref, dk_sc, dv_sc) = _doc_refs(refs, cfg)  # docs: (key ids, query ids)
    d, bs = cfg.dims, cfg.dims.block
    b, kvh, kj, g, t = (pl.program_id(a) for a in range(5))
    h = kvh * d.group + g
    row = (b * d.mask_heads + _div(h, d.mask_group)) * d.n_k + kj
    qb = data_ref[row * d.n_q + t]

    @pl.when(jnp.logical_and(g == 0, t == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def body(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = _dot(k, q, _NT, q.dtype) * cfg.scale  # [keys, queries]
        if masked:
            k_pos = kj * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
            q_pos = qb * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
            st = _masked(st, _visible(q_pos, k_pos, cfg), docs, bs)
        pt = jnp.exp(st - lse_ref[...])
        dv_sc[...] += _dot(pt.astype(do.dtype), do, _NN, do.dtype)
        dpt = _dot(v, do, _NT, do.dtype)
        dst = pt * (dpt - delta_ref[...])
        dk_sc[...] += _dot(dst.astype(q.dtype), q, _NN, q.dtype)

    _branches(t < cnt_ref[row], _is_full(qb, kj, cfg), body)

    @pl.when(jnp.logical_and(g == d.group - 1, t == d.n_q - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays here are head-major and padded: q [B, N, T_p, D_p],
# k/v [B, K, S_p, D_p], lse/delta [B, N, 1, T_p].

def slot_lists(mask):
    """Flattened (data, counts) of the rows of a restricted mask bool [B, H, R, C].

    data[b, h, r, t] (flattened) is the t-th selected column of the row for t < count, and the
    row's last selected column after that (0 for an empty row), so that padding slots repeat the
    previous block index and the pipeline fetches nothing new.
    """
    idx = common.mask_to_indices(mask)  # ascending, padded with -1
    cnt = mask.sum(-1, dtype=jnp.int32)
    last = jnp.take_along_axis(idx, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
    data = jnp.where(idx >= 0, idx, jnp.maximum(last, 0))
    return data.reshape(-1), cnt.reshape(-1)


def _call(kernel, cfg: _Config, *, grid, in_specs, out_specs, out_shape, scratch, semantics, name):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape, compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=cfg.interpret, name=name)


def _row_grid_specs(cfg: _Config, dh: int):
    """BlockSpecs of the (b, h, i, t) grid: q-row tile, the listed K/V tile, row statistics, and
    (segment ids) the q-row ids and the listed key block's ids."""
    d, bs = cfg.dims, cfg.dims.block

    def kv_map(b, h, i, t, data, cnt):
        row = (b * d.mask_heads + _div(h, d.mask_group)) * d.n_q + i
        return b, _div(h, d.group), data[row * d.n_k + t], 0

    q_tile = pl.BlockSpec((None, None, bs, dh), lambda b, h, i, t, *_: (b, h, i, 0))
    kv_tile = pl.BlockSpec((None, None, bs, dh), kv_map)
    row_vec = pl.BlockSpec((None, None, 1, bs), lambda b, h, i, t, *_: (b, h, 0, i))
    doc_specs = [pl.BlockSpec((None, bs, LANES), lambda b, h, i, t, *_: (b, i, 0)),
                 pl.BlockSpec((None, SUBLANES, bs), lambda *idx: (idx[0], 0, kv_map(*idx)[2]))]
    return q_tile, kv_tile, row_vec, doc_specs if cfg.segmented else []


class _Docs(NamedTuple):
    """Id arrays the kernels read (empty without segment ids): forward / dq tiles are (query rows,
    key columns), transposed dk/dv tiles (key rows, query columns)."""

    forward: tuple = ()
    transposed: tuple = ()


def _docs(seg: common.SegmentIds, cfg: _Config) -> _Docs:
    if not cfg.segmented:
        return _Docs()
    d = cfg.dims
    q_col, q_row = doc_layouts(seg.q, d.n_q * d.block)
    kv_col, kv_row = doc_layouts(seg.kv, d.n_k * d.block)
    return _Docs((q_col, kv_row), (kv_col, q_row))


def doc_layouts(ids, seq: int):
    """int [B, L] ids padded to `seq` (last id repeated) -> (lane-replicated [B, seq, 128] for ids
    along tile rows, sublane-replicated [B, 8, seq] for ids along tile columns)."""
    ids = jnp.pad(ids, ((0, 0), (0, seq - ids.shape[1])), mode="edge")
    return (jnp.broadcast_to(ids[:, :, None], (*ids.shape, LANES)),
            jnp.broadcast_to(ids[:, None, :], (ids.shape[0], SUBLANES, seq)))


def _forward(q, k, v, lists, docs, cfg: _Config):
    d, bs = cfg.dims, cfg.dims.block
    b, n, t_p, dh = q.shape
    q_tile, kv_tile, row_vec, doc_specs = _row_grid_specs(cfg, dh)
    return _call(
        _fwd_kernel, cfg, grid=(b, n, d.n_q, d.n_k),
        in_specs=[q_tile, kv_tile, kv_tile, *doc_specs], out_specs=[q_tile, row_vec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, 1, t_p), jnp.float32)],
        scratch=[pltpu.VMEM((bs, LANES), jnp.float32), pltpu.VMEM((bs, LANES), jnp.float32),
                 pltpu.VMEM((bs, dh), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        name="block_sparse_tpu_fwd")(*lists, q, k, v, *docs.forward)


def _backward(q, k, v, do, lse, delta, mask, docs, cfg: _Config):
    d, bs = cfg.dims, cfg.dims.block
    b, n, t_p, dh = q.shape
    q_tile, kv_tile, row_vec, doc_specs = _row_grid_specs(cfg, dh)
    dq = _call(
        _dq_kernel, cfg, grid=(b, n, d.n_q, d.n_k),
        in_specs=[q_tile, kv_tile, kv_tile, q_tile, row_vec, row_vec, *doc_specs], out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[pltpu.VMEM((bs, dh), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        name="block_sparse_tpu_dq")(*slot_lists(mask), q, k, v, do, lse, delta, *docs.forward)

    # Transposed lists: per key block, the query blocks that selected it.
    def q_map(b, kvh, j, g, t, data, cnt):
        h = kvh * d.group + g
        row = (b * d.mask_heads + _div(h, d.mask_group)) * d.n_k + j
        return b, h, data[row * d.n_q + t], 0

    def row_map(*idx):
        b, h, qb, _ = q_map(*idx)
        return b, h, 0, qb

    q_listed = pl.BlockSpec((None, None, bs, dh), q_map)
    row_listed = pl.BlockSpec((None, None, 1, bs), row_map)
    kv_own = pl.BlockSpec((None, None, bs, dh), lambda b, kvh, j, g, t, *_: (b, kvh, j, 0))
    doc_specs = [pl.BlockSpec((None, bs, LANES), lambda b, kvh, j, g, t, *_: (b, j, 0)),
                 pl.BlockSpec((None, SUBLANES, bs), lambda *idx: (idx[0], 0, q_map(*idx)[2]))]
    dk, dv = _call(
        _dkv_kernel, cfg, grid=(b, d.kv_heads, d.n_k, d.group, d.n_q),
        in_specs=[q_listed, kv_own, kv_own, q_listed, row_listed, row_listed,
                  *(doc_specs if cfg.segmented else [])],
        out_specs=[kv_own, kv_own],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        scratch=[pltpu.VMEM((bs, dh), jnp.float32), pltpu.VMEM((bs, dh), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        name="block_sparse_tpu_dkv")(*slot_lists(jnp.swapaxes(mask, -1, -2)), q, k, v, do, lse, delta,
                                     *docs.transposed)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# custom_vjp glue: layout, padding, selection restricted to possible tiles, LSE conventions.

def _heads(x, seq: int, dh: int):
    """[B, L, H, D] -> zero-padded, head-major [B, H, seq, dh]."""
    return jnp.swapaxes(common.pad_axis(common.pad_axis(x, 1, seq), 3, dh), 1, 2)


def _unheads(x, seq: int, dh: int):
    return jnp.swapaxes(x, 1, 2)[:, :seq, :, :dh]


def _restricted(block_mask, seg, cfg: _Config):
    """The selection without tiles that hold no visible pair (causally, or between documents)."""
    possible, _ = common.tile_classes(cfg.dims, cfg.causal)
    mask = block_mask & possible
    if cfg.segmented:
        mask = mask & common.segment_tile_classes(seg, cfg.dims)[0]
    return mask


def _fwd_impl(q, k, v, block_mask, seg, cfg: _Config):
    d = cfg.dims
    dh = padded_head_dim(d.head_dim)
    lists = slot_lists(_restricted(block_mask, seg, cfg))
    kp, vp = (_heads(x, d.n_k * d.block, dh) for x in (k, v))
    o, lse_int = _forward(_heads(q, d.n_q * d.block, dh), kp, vp, lists, _docs(seg, cfg), cfg)
    o = _unheads(o, d.seq_q, d.head_dim)
    lse = lse_int[:, :, 0, :d.seq_q]
    return o, jnp.where(lse == jnp.inf, -jnp.inf, lse), lse_int


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, block_mask, seg, cfg: _Config):
    o, lse, _ = _fwd_impl(q, k, v, block_mask, seg, cfg)
    return o, lse


def _attention_fwd(q, k, v, block_mask, seg, cfg: _Config):
    o, lse, lse_int = _fwd_impl(q, k, v, block_mask, seg, cfg)
    return (o, lse), (q, k, v, block_mask, seg, o, lse_int)


def _attention_bwd(cfg: _Config, res, cotangents):
    q, k, v, block_mask, seg, o, lse_int = res
    do, dlse = cotangents
    d = cfg.dims
    dh = padded_head_dim(d.head_dim)
    t_p, s_p = d.n_q * d.block, d.n_k * d.block
    # d(lse)/d(s) = p, so an LSE cotangent enters exactly like -delta: ds = p * (dp - delta + dlse).
    delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    delta = common.pad_axis(delta, 2, t_p)[:, :, None, :]
    dq, dk, dv = _backward(
        _heads(q, t_p, dh), _heads(k, s_p, dh), _heads(v, s_p, dh), _heads(do.astype(q.dtype), t_p, dh),
        lse_int, delta, _restricted(block_mask, seg, cfg), _docs(seg, cfg), cfg)
    return (_unheads(dq, d.seq_q, d.head_dim), _unheads(dk, d.seq_kv, d.head_dim),
            _unheads(dv, d.seq_kv, d.head_dim), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None,
                           segment_ids=None, window=None, key_bias=None, skip_threshold=None, interpret=False,
                           return_lse=False, return_skipped=False):
    """Softmax attention restricted to the selected blocks (Pallas Mosaic TPU kernels).

    Args:
      q: [B, T, N, D]; k, v: [B, S, K, D] with N a multiple of K (query head h uses kv head h // G).
      block_mask: bool [B, H, ceil(T/bs), ceil(S/bs)], H = K (shared by a GQA group) or N, or a
        tile-level `Selection` (token-level ones raise NotImplementedError).
      causal: also mask keys after the query position (aligned at the end when S != T).
      block_size: bs, one of 128, 256, 512 on TPU (the default 64 of the shared signature is
        rejected with a ValueError: pass block_size explicitly).
      sm_scale: logit scale, default 1/sqrt(D).
      segment_ids: None, int [B, T] (S == T) or `common.SegmentIds`: tiles between documents are
        dropped; with ids every other tile takes the masked branch, which compares the row and
        column ids (lane- and sublane-replicated, as in splash attention).
      window: None, or one that hides nothing (>= S keys): other windows raise
        NotImplementedError (use impl='pallas' or 'xla').
      interpret: True runs the TPU interpreter on CPU (`pltpu.InterpretParams()`); an
        InterpretParams instance is used as given. False compiles for a TPU.
      return_lse: also return the natural-log LSE of each row's scaled logits, f32 [B, N, T]
        (-inf for rows with no visible key, whose output is 0).
    Returns o [B, T, N, D] in q's dtype (and the LSE). Differentiable in q, k, v (and through LSE).
    """
    common.reject_bias_and_skip("Mosaic TPU", key_bias, skip_threshold, return_skipped)
    if isinstance(block_mask, Selection):
        if block_mask.granularity == "token":
            raise NotImplementedError("token-level selections are not implemented in the Mosaic TPU kernels; "
                                      "use impl='pallas' (GPU) or impl='xla'")
        block_mask = block_mask.to_mask()
    dims = attention_dims(q, k, v, block_mask, block_size)
    if common.check_window(window, causal, dims.seq_kv) is not None:
        raise NotImplementedError(f"window={window} is not supported on the TPU kernel yet; "
                                  "use impl='pallas' (GPU) or impl='xla'")
    seg = common.segment_ids_pair(segment_ids, dims)
    cfg = _Config(dims, bool(causal), common.default_scale(sm_scale, dims.head_dim),
                  interpret_params(interpret), segmented=seg is not None)
    if seg is None:  # unread: the kernels take no id refs
        seg = common.SegmentIds(jnp.zeros((dims.batch, dims.seq_q), jnp.int32),
                                jnp.zeros((dims.batch, dims.seq_kv), jnp.int32))
    o, lse = _attention(q, k, v, block_mask, seg, cfg)
    return (o, lse) if return_lse else o
