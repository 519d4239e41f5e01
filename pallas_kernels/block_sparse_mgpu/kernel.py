"""Block-sparse flash attention forward on Mosaic GPU (Hopper: TMA + wgmma, warp specialised).

`impl="mosaic_gpu"` means "Mosaic GPU forward, Triton backward" in v1: the forward below writes o
and the base-2 row LSE in exactly the form the Triton forward does, so the custom_vjp hands them
to `pallas_kernels.block_sparse.kernel`'s backward (dq and dk/dv kernels) unchanged.

CTA layout (FlashAttention-3's, as in JAX's `ops/gpu/attention_mgpu.py`): grid (N, nQ / W, B);
a CTA holds W consecutive 64-row query tiles of one (batch, query head), W = `compute_wgs`
(default 2), with W compute warpgroups and one memory warpgroup.

  memory wg   reads each tile's index list (the restricted selection, `common.block_lists`)
              from global memory one scalar at a time and issues the TMA copies of the selected
              K/V blocks (rows kb * 64 of kv head n // G) into the tile's own ring of `depth`
              SMEM slots; a slot is refilled once its compute wg has arrived on its "free"
              barrier. Lists are per tile, so each compute wg has its own ring.
  compute wg  one query tile: Q by TMA into SMEM, then for t < count: S = Q K^T (wgmma), online
              softmax in base 2 in registers, O += P V (wgmma). Full tiles come first in each
              list and skip the elementwise mask; the masked tail (causal diagonal, ragged last
              key block) compares positions. With W = 2 the two compute wgs ping-pong on a
              schedule barrier (one's softmax overlaps the other's wgmma); a wg whose list is
              shorter keeps meeting the barrier until the longer list ends.

Numerics are the Triton kernel's: a row that has seen only masked keys keeps m = -inf and
subtracts 0, a row with no visible key outputs 0 with internal LSE +inf (the public LSE is
natural-log, -inf there). Scope of v1 (ValueError/NotImplementedError otherwise): bf16/fp16,
block_size 64, head_dim 33..128 (zero-padded to 64 or 128), no segment_ids, no window. Ragged
T/S are zero-padded to whole tiles like the Triton kernel. Needs a Hopper GPU: there is no
interpret mode (wgmma has no interpreter rule), so it is tested compiled only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse import common
# The Triton module owns the pieces both forwards share with its backward: the config the
# backward reads, the selection restricted to possible tiles, padding and the backward itself.
from pallas_kernels.block_sparse import kernel as triton_kernel
from pallas_kernels.block_sparse.common import LN2, LOG2E
from pallas_kernels.block_sparse.selection import Selection

__all__ = ["MgpuTuning", "block_sparse_attention", "tuning"]

BLOCK = 64  # query tile = key tile = selection block (one wgmma M of 64 rows per compute wg)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SMEM_BUDGET = 200 * 1024  # of the H100/H200's 227 KiB, leaving room for barriers and reductions
MAX_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class MgpuTuning:
    """compute_wgs: query tiles (compute warpgroups) per CTA, 1 or 2 (2 ping-pong their softmax
    against each other's wgmma). depth: K/V ring slots per compute wg; None = as many as fit in
    SMEM_BUDGET, at most MAX_DEPTH."""

    compute_wgs: int = 2
    depth: int | None = None

    def __post_init__(self):
        if self.compute_wgs not in (1, 2):
            raise ValueError(f"compute_wgs={self.compute_wgs}; choose 1 or 2")
        if self.depth is not None and not 2 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth={self.depth}; choose 2..{MAX_DEPTH} or None")


_TUNING = contextvars.ContextVar("mgpu_tuning", default=MgpuTuning())


@contextlib.contextmanager
def tuning(params: MgpuTuning):
    """Overrides the CTA layout of kernels traced inside (benchmarks; trace inside, e.g. a fresh jit)."""
    token = _TUNING.set(params)
    try:
        yield
    finally:
        _TUNING.reset(token)


def ring_depth(tune: MgpuTuning, head_dim: int, itemsize: int) -> int:
    """K/V ring slots per compute wg: Q tiles + W * depth * (K + V) blocks + LSE rows in SMEM."""
    if tune.depth is not None:
        return tune.depth
    w, tile = tune.compute_wgs, BLOCK * head_dim * itemsize
    fixed = w * (tile + BLOCK * 4)
    return max(2, min(MAX_DEPTH, (SMEM_BUDGET - fixed) // (2 * w * tile)))


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Static shape of one kernel launch (arrays padded: rows n_rows * 64, keys n_k * 64)."""

    cfg: triton_kernel._Config
    compute_wgs: int
    depth: int
    head_dim: int  # padded: 64 or 128
    n_rows: int  # query tiles, a multiple of compute_wgs


def _attention_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                      q_smem, k_smem, v_smem, lse_smem,
                      q_ready, k_ready, v_ready, k_free, v_free, schedule, *, lc: _Launch):
    d, w_count, depth = lc.cfg.dims, lc.compute_wgs, lc.depth
    dtype = q_ref.dtype
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    group = lax.axis_index("q_tiles")
    if lc.cfg.causal:  # causal rows grow with the tile index: launch the longest first
        group = lc.n_rows // w_count - 1 - group
    mask_head = lax.div(head, jnp.int32(d.mask_group))
    kv_head = lax.div(head, jnp.int32(d.group))

    def tile_of(w):
        return group * w_count + w

    def count(w, which: int):  # which = 0: full tiles (the prefix), 1: all tiles
        return cnt_ref[batch, mask_head, tile_of(w), which]

    def block_index(w, t):
        return idx_ref[batch, mask_head, tile_of(w), t]

    def slot(w, t):  # ring slot of step t of compute wg w; each wg owns `depth` consecutive slots
        return w * depth + lax.rem(t, jnp.int32(depth))

    def meet_schedule():  # both compute wgs pass here together (a no-op with one)
        if w_count == 2:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    @pl.when(wg < w_count)
    def _compute_wg():
        if w_count == 2:  # the memory wg gives its registers to the two compute wgs
            plgpu.set_max_registers(232, action="increase")
        w = wg
        row0 = tile_of(w) * BLOCK
        n_full, n_all = count(w, 0), count(w, 1)
        q_tile = q_smem.at[w]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, BLOCK), head], q_tile, q_ready.at[w])
        plgpu.barrier_wait(q_ready.at[w])

        acc = plgpu.layout_cast(jnp.zeros((BLOCK, lc.head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))

        @pl.when(n_all > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[slot(w, 0)])

        pl.when(w == 1)(meet_schedule)  # wg 1 starts half a step behind wg 0

        def step(t, carry, *, masked: bool):
            acc, m, l = carry
            s_ = slot(w, t)
            if masked:  # read before the wgmma so that its latency hides behind it
                col0 = block_index(w, t) * BLOCK

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_tile, k_smem.at[s_].transpose((1, 0)))
                meet_schedule()
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
            plgpu.barrier_arrive(k_free.at[s_])
            s = s * (lc.cfg.scale * LOG2E)
            if masked:
                rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=plgpu.Layout.WGMMA)
                cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=plgpu.Layout.WGMMA)
                cols = cols + col0
                keep = cols < d.seq_kv
                if lc.cfg.causal:
                    keep = keep & (cols <= rows + (row0 + d.offset))
                s = jnp.where(keep, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            # Only a masked tile can leave a row without a visible key (m_new = -inf).
            m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m - m_sub)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_sub, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            # As in JAX's FA3 example: keep the softmax before the barrier (ordering matters there).
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            # Softmax done: let the other wg's wgmma run, then take the tensor cores back.
            if w_count == 2:
                plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[s_])
            if w_count == 2:
                plgpu.barrier_wait(schedule)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[s_])

                @pl.when(t + 1 < n_all)  # wait for the next K while this wgmma runs
                def _():
                    plgpu.barrier_wait(k_ready.at[slot(w, t + 1)])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[s_])
            return acc, m_new, l

        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
        if w_count == 2:  # the shorter list keeps meeting the schedule barrier until both end
            n_max = lax.max(count(0, 1), count(1, 1))

            def idle_step(t, _):  # the two barrier meetings of a step of the longer list
                meet_schedule()
                meet_schedule()

            lax.fori_loop(n_all, n_max, idle_step, None)
            pl.when(w == 0)(meet_schedule)

        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        q_tile[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
        lse_smem.at[w][...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, pl.ds(row0, BLOCK), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[w], lse_ref.at[batch, head, pl.ds(row0, BLOCK)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == w_count)
    def _memory_wg():
        if w_count == 2:
            plgpu.set_max_registers(40, action="decrease")
        n_all = [count(w, 1) for w in range(w_count)]

        @pl.loop(0, functools.reduce(lax.max, n_all))
        def _(t):
            for w in range(w_count):  # lockstep over the tiles: they advance at one pace
                @pl.when(t < n_all[w])
                def _():
                    rows = pl.ds(block_index(w, t) * BLOCK, BLOCK)
                    s_ = slot(w, t)

                    @pl.when(t >= depth)  # the slot held step t - depth
                    def _():
                        plgpu.barrier_wait(k_free.at[s_])

                    plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[s_], k_ready.at[s_])

                    @pl.when(t >= depth)
                    def _():
                        plgpu.barrier_wait(v_free.at[s_])

                    plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[s_], v_ready.at[s_])


def _launch(q, k, v, idx, cnt, lc: _Launch):
    """o [B, n_rows * 64, N, D_p] and base-2 LSE [B, N, n_rows * 64] of padded inputs."""
    d, w, depth = lc.cfg.dims, lc.compute_wgs, lc.depth
    b, t_p, n, dh = q.shape
    # 128-byte swizzle: a 16-bit row of 64 elements per swizzle atom (as the wgmma operands want).
    smem_tile = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    scratch = (
        plgpu.SMEM((w, BLOCK, dh), q.dtype, **smem_tile),  # Q, then the output tile
        plgpu.SMEM((w * depth, BLOCK, dh), k.dtype, **smem_tile),
        plgpu.SMEM((w * depth, BLOCK, dh), v.dtype, **smem_tile),
        plgpu.SMEM((w, BLOCK), jnp.float32),
        plgpu.Barrier(num_barriers=w),  # Q loaded
        plgpu.Barrier(num_barriers=w * depth),  # K slot loaded
        plgpu.Barrier(num_barriers=w * depth),  # V slot loaded
        plgpu.Barrier(num_arrivals=1, num_barriers=w * depth),  # K slot free again
        plgpu.Barrier(num_arrivals=1, num_barriers=w * depth),  # V slot free again
        plgpu.Barrier(num_arrivals=w),  # schedule (ping-pong) barrier; unused when w == 1
    )
    return plgpu.kernel(
        functools.partial(_attention_kernel, lc=lc),
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t_p), jnp.float32)),
        grid=(n, lc.n_rows // w, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=w + 1,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(idx, cnt, q, k, v)


def _fwd_impl(q, k, v, block_mask, seg, lc: _Launch):
    """(o, natural LSE [B, N, T], base-2 LSE [B, N, nQ * 64] as the Triton backward wants it)."""
    cfg = lc.cfg
    d = cfg.dims
    mask, full = triton_kernel._restricted(block_mask, seg, cfg)
    idx, cnt = common.block_lists(mask, full)
    # Extra query tiles (to fill the last CTA) get empty lists: zero counts, never-read indices.
    idx, cnt = (common.pad_axis(x, 2, lc.n_rows) for x in (idx, cnt))
    qp = triton_kernel._pad(q, lc.n_rows * BLOCK, lc.head_dim)
    kp, vp = (triton_kernel._pad(x, d.n_k * BLOCK, lc.head_dim) for x in (k, v))
    o, lse2 = _launch(qp, kp, vp, idx, cnt, lc)
    o = o[:, :d.seq_q, :, :d.head_dim]
    lse2 = lse2[..., :d.n_q * BLOCK]
    lse = jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * LN2)[..., :d.seq_q]
    return o, lse, lse2


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, block_mask, seg, lc: _Launch):
    o, lse, _ = _fwd_impl(q, k, v, block_mask, seg, lc)
    return o, lse


def _attention_fwd(q, k, v, block_mask, seg, lc: _Launch):
    o, lse, lse2 = _fwd_impl(q, k, v, block_mask, seg, lc)
    # The residuals of the Triton forward: (q, k, v, mask, ids, o, base-2 LSE, +inf when empty).
    return (o, lse), (q, k, v, block_mask, seg, o, lse2)


def _attention_bwd(lc: _Launch, res, cotangents):
    # The Triton backward takes an (unread, no-gradient) key bias among its residuals and the
    # (ignored) cotangent of its fused block scores.
    q, k, v, block_mask, seg, o, lse2 = res
    res = (q, k, v, block_mask, seg, triton_kernel.no_bias(lc.cfg.dims), o, lse2)
    return triton_kernel._attention_bwd(lc.cfg, res, (*cotangents, None, None))[:5]


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_scope(q, dims: common.Dims, segment_ids, window, interpret) -> None:
    """What v1 does not do: NotImplementedError for features, ValueError for values out of range."""
    if segment_ids is not None:
        raise NotImplementedError("segment_ids are not supported by the mosaic_gpu forward yet (v1); "
                                  "use impl='pallas'")
    if window is not None:
        raise NotImplementedError("window is not supported by the mosaic_gpu forward yet (v1); "
                                  "use impl='pallas'")
    if interpret:
        raise ValueError("interpret=True: the mosaic_gpu kernel has no interpret mode (wgmma); "
                         "use impl='pallas' with interpret=True, or impl='xla'")
    if jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"dtype={q.dtype}: the mosaic_gpu forward takes bfloat16 or float16")
    if dims.block != BLOCK:
        raise ValueError(f"block_size={dims.block}: the mosaic_gpu forward takes block_size={BLOCK}")
    if not 32 < dims.head_dim <= 128:
        raise ValueError(f"head_dim={dims.head_dim}: the mosaic_gpu forward takes 33..128 "
                         "(zero-padded to 64 or 128)")


def block_sparse_attention(q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None,
                           segment_ids=None, window=None, key_bias=None, skip_threshold=None, interpret=False,
                           return_lse=False, return_skipped=False):
    """Softmax attention restricted to the selected blocks: Mosaic GPU forward, Triton backward.

    Same contract as `pallas_kernels.block_sparse.reference.block_sparse_attention` within v1's
    scope: q [B, T, N, D], k/v [B, S, K, D] (N a multiple of K), bf16 or fp16, 32 < D <= 128;
    block_mask bool [B, H, nQ, nK] (H = K or N) or a tile `Selection`; block_size 64; causal
    end-aligned; segment_ids and window raise NotImplementedError; interpret must be falsy.
    Returns o [B, T, N, D] in q's dtype (and the natural-log LSE f32 [B, N, T], -inf for rows
    with no visible key, whose output is 0). Differentiable in q, k, v (and through the LSE) by
    the Triton backward kernels. Needs a Hopper GPU.
    """
    common.reject_bias_and_skip("mosaic_gpu", key_bias, skip_threshold, return_skipped)
    if isinstance(block_mask, Selection):
        if block_mask.granularity == "token":
            raise NotImplementedError("token-level selections are not supported by the mosaic_gpu "
                                      "forward (v1); use impl='pallas'")
        block_mask = block_mask.to_mask()
    dims = common.attention_dims(q, k, v, block_mask, block_size)
    _check_scope(q, dims, segment_ids, window, interpret)
    cfg = triton_kernel._Config(dims, bool(causal), None, common.default_scale(sm_scale, dims.head_dim),
                                interpret=False, segmented=False)
    tune = _TUNING.get()
    head_dim = common.padded_head_dim(dims.head_dim)
    lc = _Launch(cfg, tune.compute_wgs, ring_depth(tune, head_dim, q.dtype.itemsize), head_dim,
                 n_rows=-(-dims.n_q // tune.compute_wgs) * tune.compute_wgs)
    # Unread placeholders: the Triton backward takes ids in every call.
    seg = common.SegmentIds(jnp.zeros((dims.batch, dims.seq_q), jnp.int32),
                            jnp.zeros((dims.batch, dims.seq_kv), jnp.int32))
    o, lse = _attention(q, k, v, block_mask, seg, lc)
    return (o, lse) if return_lse else o
