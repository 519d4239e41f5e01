"""Block-sparse flash attention backward on Mosaic GPU: the dq and dk/dv kernels (Hopper).

Both follow the Triton backward's math (FlashAttention-2: p recomputed from the base-2 LSE,
ds = p * (dp - delta), with delta = rowsum(o * do) - dlse so an LSE cotangent enters for free)
and its lists, with Hopper's machinery: a memory warpgroup streams the blocks of each list by TMA
into a ring of SMEM slots, W compute warpgroups (one 64-row tile each) run the products on wgmma.

  dq     grid (N, nQ / W, B): a query tile of one head; its forward list (full tiles first, then
         the masked tail). Per key block: S = Q K^T, dP = dO V^T, dS, dq += dS K.
  dk/dv  grid (K, nK / W, B): a key tile of one kv head, and every query head of its GQA group in
         turn (G static loops), so dk/dv accumulate over the group in f32 registers and are
         written once in K/V's dtype: no per-query-head copies to sum. Per (head, query block)
         of the transposed lists (masked tiles first): S^T = K Q^T, P^T, dv += P^T dO,
         dP^T = V dO^T, dS^T, dk += dS^T Q.

Masked tiles (causal diagonal, window edge, ragged last key block, document boundaries) compare
positions and ids in `tiles.tile_keep`; the others skip the compare. Tiles beyond the real rows
(padding to whole CTAs) get empty lists.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import LOG2E
from pallas_kernels.block_sparse_mgpu import tiles
from pallas_kernels.block_sparse_mgpu.tiles import BLOCK, Stream

SMEM_BUDGET = 200 * 1024  # of the H100/H200's 227 KiB, leaving room for barriers and reductions
MAX_DEPTH = 4


def ring_depth(fixed_bytes: int, slot_bytes: int, compute_wgs: int) -> int:
    """Ring slots per compute wg that fit beside `fixed_bytes` of SMEM: 2..MAX_DEPTH."""
    return max(2, min(MAX_DEPTH, (SMEM_BUDGET - fixed_bytes) // (compute_wgs * slot_bytes)))


@dataclasses.dataclass(frozen=True)
class BackwardLaunch:
    """Static shape of the two backward launches (query rows padded to n_q_rows * 64, keys to
    n_k_rows * 64, both multiples of compute_wgs tiles; head_dim padded to 64 or 128)."""

    dims: common.Dims
    masking: tiles.Masking
    scale: float
    compute_wgs: int
    head_dim: int
    n_q_rows: int
    n_k_rows: int
    interpret: bool

    @property
    def tile_bytes(self) -> int:
        return BLOCK * self.head_dim * 2

    def dq_depth(self) -> int:  # fixed: Q, dO, LSE, delta, ids per wg; a slot: K, V, key ids
        w = self.compute_wgs
        return ring_depth(w * (2 * self.tile_bytes + 3 * BLOCK * 4), 2 * self.tile_bytes + BLOCK * 4, w)

    def dkv_depth(self) -> int:  # fixed: K, V, ids per wg; a slot: Q, dO, LSE, delta, query ids
        w = self.compute_wgs
        return ring_depth(w * (2 * self.tile_bytes + BLOCK * 4), 2 * self.tile_bytes + 3 * BLOCK * 4, w)


def _stage(lb: BackwardLaunch, dtype):
    """Interpret mode only: an SMEM tile per wg to stage register operands of wgmma through."""
    return {"stage": tiles.smem_tiles((lb.compute_wgs, BLOCK, BLOCK), dtype)} if lb.interpret else {}


# ------------------------------------------------------------------------------------------------
# dq

def _dq_kernel(idx_ref, cnt_ref, qid_ref, kid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               smem, bars, *, lb: BackwardLaunch, depth: int):
    w_count, m = lb.compute_wgs, lb.masking
    dtype = q_ref.dtype
    cta = tiles.QueryTiles.of_cta(idx_ref, cnt_ref, lb.dims, w_count, lb.n_q_rows, m.causal)
    batch, head, wg, kv_head = cta.batch, cta.head, cta.wg, cta.kv_head
    tile_of, count, block_index = cta.tile, cta.count, cta.block_index

    @pl.when(wg < w_count)
    def _compute_wg():
        tiles.claim_registers(w_count)
        w = wg
        row0 = tile_of(w) * BLOCK
        rows = pl.ds(row0, BLOCK)
        tiles.load_tiles((("q", q_ref.at[batch, rows, head]), ("do", do_ref.at[batch, rows, head]),
                          ("lse", lse_ref.at[batch, head, rows]), ("delta", delta_ref.at[batch, head, rows]),
                          *((("qid", qid_ref.at[batch, rows]),) if m.segmented else ())), smem, bars, w)
        lse = tiles.row_vector(smem["lse"].at[w], 0)
        delta = tiles.row_vector(smem["delta"].at[w], 0)
        q_ids = tiles.row_vector(smem["qid"].at[w], 0) if m.segmented else None
        stage = smem["stage"].at[w] if lb.interpret else None
        shape = (BLOCK, BLOCK)
        n_full, n_all = count(w, 0), count(w, 1)

        def step(t, dq, *, masked: bool):
            s_ = tiles.ring_slot(w, t, depth)
            plgpu.barrier_wait(bars["k"].at[s_])
            k_ids = None
            if m.segmented:  # read before K's slot is released
                plgpu.barrier_wait(bars["kid"].at[s_])
                k_ids = tiles.row_vector(smem["kid"].at[s_], 1)
            s = tiles.mma(None, smem["q"].at[w], smem["k"].at[s_].transpose((1, 0))) * (lb.scale * LOG2E)
            plgpu.barrier_wait(bars["v"].at[s_])
            dp = tiles.mma(None, smem["do"].at[w], smem["v"].at[s_].transpose((1, 0)))
            tiles.release(bars["v_free"], s_, t, n_all, depth)
            if masked:
                keep = tiles.tile_keep(m, row0, block_index(w, t) * BLOCK, q_ids=q_ids, k_ids=k_ids)
                s = jnp.where(keep, s, -jnp.inf)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, shape, [0]))
            ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
            dq = tiles.mma(dq, ds.astype(dtype), smem["k"].at[s_], stage=stage)
            tiles.release(bars["k_free"], s_, t, n_all, depth)
            return dq

        dq = plgpu.layout_cast(jnp.zeros((BLOCK, lb.head_dim), jnp.float32), plgpu.Layout.WGMMA)
        dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), dq)
        smem["q"].at[w][...] = (dq * lb.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem["q"].at[w], dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == w_count)(lambda: tiles.stream_key_blocks(
        block_index, [count(w, 1) for w in range(w_count)], (k_ref, v_ref, kid_ref), batch, kv_head, smem, bars,
        depth, m.segmented))


def _dq(q, k, v, do, lse2, delta, idx, cnt, seg, lb: BackwardLaunch):
    w, dh, depth = lb.compute_wgs, lb.head_dim, lb.dq_depth()
    b, _, n, _ = q.shape
    smem = {"q": tiles.smem_tiles((w, BLOCK, dh), q.dtype), "do": tiles.smem_tiles((w, BLOCK, dh), q.dtype),
            "lse": plgpu.SMEM((w, BLOCK), jnp.float32), "delta": plgpu.SMEM((w, BLOCK), jnp.float32),
            "qid": plgpu.SMEM((w, BLOCK), jnp.int32),
            "k": tiles.smem_tiles((w * depth, BLOCK, dh), k.dtype), "v": tiles.smem_tiles((w * depth, BLOCK, dh), k.dtype),
            "kid": plgpu.SMEM((w * depth, BLOCK), jnp.int32), **_stage(lb, q.dtype)}
    bars = {**{name: plgpu.Barrier(num_barriers=w) for name in ("q", "do", "lse", "delta", "qid")},
            **{name: plgpu.Barrier(num_barriers=w * depth) for name in ("k", "v", "kid")},
            **{name: plgpu.Barrier(num_arrivals=1, num_barriers=w * depth) for name in ("k_free", "v_free")}}
    return tiles.launch(
        functools.partial(_dq_kernel, lb=lb, depth=depth),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(n, lb.n_q_rows // w, b),
        grid_names=("heads", "q_tiles", "batch"), compute_wgs=w, scratch=(smem, bars),
        interpret=lb.interpret)(idx, cnt, seg.q, seg.kv, q, k, v, do, lse2, delta)


# ------------------------------------------------------------------------------------------------
# dk/dv

def _dkv_kernel(idx_ref, cnt_ref, qid_ref, kid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, smem, bars, *, lb: BackwardLaunch, depth: int):
    d, w_count, m = lb.dims, lb.compute_wgs, lb.masking
    dtype = q_ref.dtype
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    tile_of = lambda w: lax.axis_index("k_tiles") * w_count + w  # noqa: E731

    def query_head(g):
        return kv_head * d.group + g

    def counts(w, g):  # (masked tiles, all tiles) of head g's transposed list
        row = (batch, lax.div(query_head(g), jnp.int32(d.mask_group)), tile_of(w))
        return cnt_ref[(*row, 0)], cnt_ref[(*row, 1)]

    def steps(w):  # the group's lists end to end
        return functools.reduce(lambda total, g: total + counts(w, g)[1], range(d.group), jnp.int32(0))

    def query_block(w, g, t):
        return idx_ref[batch, lax.div(query_head(g), jnp.int32(d.mask_group)), tile_of(w), t]

    @pl.when(wg < w_count)
    def _compute_wg():
        tiles.claim_registers(w_count)
        w = wg
        key0 = tile_of(w) * BLOCK
        keys = pl.ds(key0, BLOCK)
        tiles.load_tiles((("k", k_ref.at[batch, keys, kv_head]), ("v", v_ref.at[batch, keys, kv_head]),
                          *((("kid", kid_ref.at[batch, keys]),) if m.segmented else ())), smem, bars, w)
        k_ids = tiles.row_vector(smem["kid"].at[w], 0) if m.segmented else None
        stage = smem["stage"].at[w] if lb.interpret else None
        shape = (BLOCK, BLOCK)
        n_steps = steps(w)

        def step(t, carry, *, g: int, first, masked: bool):
            dk, dv = carry
            s_ = tiles.ring_slot(w, first + t, depth)
            for name in ("q", "lse", *(("qid",) if m.segmented else ())):
                plgpu.barrier_wait(bars[name].at[s_])
            st = tiles.mma(None, smem["k"].at[w], smem["q"].at[s_].transpose((1, 0))) * (lb.scale * LOG2E)
            if masked:
                q_ids = tiles.row_vector(smem["qid"].at[s_], 1) if m.segmented else None
                keep = tiles.tile_keep(m, query_block(w, g, t) * BLOCK, key0, keys_as_rows=True,
                                       q_ids=q_ids, k_ids=k_ids)
                st = jnp.where(keep, st, -jnp.inf)
            pt = jnp.exp2(st - lax.broadcast_in_dim(tiles.row_vector(smem["lse"].at[s_], 1), shape, [1]))
            plgpu.barrier_wait(bars["do"].at[s_])
            dv = tiles.mma(dv, pt.astype(dtype), smem["do"].at[s_], stage=stage)
            dpt = tiles.mma(None, smem["v"].at[w], smem["do"].at[s_].transpose((1, 0)))
            plgpu.barrier_wait(bars["delta"].at[s_])
            dst = pt * (dpt - lax.broadcast_in_dim(tiles.row_vector(smem["delta"].at[s_], 1), shape, [1]))
            dk = tiles.mma(dk, dst.astype(dtype), smem["q"].at[s_], stage=stage)
            tiles.release(bars["free"], s_, first + t, n_steps, depth)
            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((BLOCK, lb.head_dim), jnp.float32), plgpu.Layout.WGMMA)
        carry, first = (zeros, zeros), jnp.int32(0)
        for g in range(d.group):  # the group's query heads in turn, each over its list
            n_masked, n_all = counts(w, g)
            carry = lax.fori_loop(0, n_masked, functools.partial(step, g=g, first=first, masked=True), carry)
            carry = lax.fori_loop(n_masked, n_all, functools.partial(step, g=g, first=first, masked=False), carry)
            first = first + n_all
        dk, dv = carry
        smem["k"].at[w][...] = (dk * lb.scale).astype(dtype)
        smem["v"].at[w][...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem["k"].at[w], dk_ref.at[batch, keys, kv_head])
        plgpu.copy_smem_to_gmem(smem["v"].at[w], dv_ref.at[batch, keys, kv_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == w_count)
    def _memory_wg():
        tiles.yield_registers(w_count)

        def locate(w, u):
            """(query head, query rows) of compute wg w's step u: the group's lists end to end."""
            head, t, first = query_head(0), u, jnp.int32(0)
            for g in range(d.group):
                n_all = counts(w, g)[1]
                here = (u >= first) & (u < first + n_all)
                head = jnp.where(here, query_head(g), head)
                t = jnp.where(here, u - first, t)
                first = first + n_all
            mask_head = lax.div(head, jnp.int32(d.mask_group))
            return head, pl.ds(idx_ref[batch, mask_head, tile_of(w), t] * BLOCK, BLOCK)

        def src(ref):
            def block(w, u):
                head, rows = locate(w, u)
                if ref.ndim == 2:  # ids [B, T]
                    return ref.at[batch, rows]
                return ref.at[batch, head, rows] if ref.ndim == 3 else ref.at[batch, rows, head]
            return block

        streams = [Stream(src(q_ref), smem["q"], bars["q"], bars["free"]),
                   Stream(src(do_ref), smem["do"], bars["do"], None),
                   Stream(src(lse_ref), smem["lse"], bars["lse"], None),
                   Stream(src(delta_ref), smem["delta"], bars["delta"], None)]
        if m.segmented:
            streams.append(Stream(src(qid_ref), smem["qid"], bars["qid"], None))
        tiles.stream_blocks([steps(w) for w in range(w_count)], streams, depth)


def _dkv(q, k, v, do, lse2, delta, idx_t, cnt_t, seg, lb: BackwardLaunch):
    w, dh, depth = lb.compute_wgs, lb.head_dim, lb.dkv_depth()
    b, _, kh, _ = k.shape
    smem = {"k": tiles.smem_tiles((w, BLOCK, dh), k.dtype), "v": tiles.smem_tiles((w, BLOCK, dh), k.dtype),
            "kid": plgpu.SMEM((w, BLOCK), jnp.int32),
            "q": tiles.smem_tiles((w * depth, BLOCK, dh), q.dtype), "do": tiles.smem_tiles((w * depth, BLOCK, dh), q.dtype),
            "lse": plgpu.SMEM((w * depth, BLOCK), jnp.float32), "delta": plgpu.SMEM((w * depth, BLOCK), jnp.float32),
            "qid": plgpu.SMEM((w * depth, BLOCK), jnp.int32), **_stage(lb, q.dtype)}
    bars = {**{name: plgpu.Barrier(num_barriers=w) for name in ("k", "v", "kid")},
            **{name: plgpu.Barrier(num_barriers=w * depth) for name in ("q", "do", "lse", "delta", "qid")},
            "free": plgpu.Barrier(num_arrivals=1, num_barriers=w * depth)}
    out = jax.ShapeDtypeStruct(k.shape, k.dtype)
    return tiles.launch(
        functools.partial(_dkv_kernel, lb=lb, depth=depth),
        out_type=(out, out), grid=(kh, lb.n_k_rows // w, b), grid_names=("kv_heads", "k_tiles", "batch"),
        compute_wgs=w, scratch=(smem, bars), interpret=lb.interpret)(
            idx_t, cnt_t, seg.q, seg.kv, q, k, v, do, lse2, delta)


def backward(q, k, v, do, lse2, delta, mask, full, seg: common.SegmentIds, lb: BackwardLaunch):
    """(dq, dk, dv) of padded inputs: q/do [B, nQ*64, N, D_p], k/v [B, nK*64, K, D_p], lse2 and
    delta f32 [B, N, nQ*64], mask/full the restricted selection and full-tile classes [B, H, nQ, nK]
    (as the Triton backward takes them), seg padded ids. Outputs keep those shapes."""
    t_p, s_p = q.shape[1], k.shape[1]
    rows, keys = lb.n_q_rows * BLOCK, lb.n_k_rows * BLOCK
    pad_q = lambda x, axis: common.pad_axis(x, axis, rows)  # noqa: E731
    pad_k = lambda x, axis: common.pad_axis(x, axis, keys)  # noqa: E731
    q, do = pad_q(q, 1), pad_q(do, 1)
    k, v = pad_k(k, 1), pad_k(v, 1)
    lse2, delta = pad_q(lse2, 2), pad_q(delta, 2)
    seg = common.SegmentIds(pad_q(seg.q, 1), pad_k(seg.kv, 1))
    # Tiles padding the last CTA get empty lists: zero counts, never-read indices.
    idx, cnt = (pad_q(x, 2) for x in common.block_lists(mask, full))
    idx_t, cnt_t = (pad_k(x, 2) for x in common.transposed_block_lists(mask, full))
    dq = _dq(q, k, v, do, lse2, delta, idx, cnt, seg, lb)
    dk, dv = _dkv(q, k, v, do, lse2, delta, idx_t, cnt_t, seg, lb)
    return dq[:, :t_p], dk[:, :s_p], dv[:, :s_p]
