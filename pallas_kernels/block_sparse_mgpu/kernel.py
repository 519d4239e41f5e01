"""Block-sparse flash attention forward on Mosaic GPU (Hopper: TMA + wgmma, warp specialised).

`impl="mosaic_gpu"`: this forward and `backward.py`'s dq and dk/dv kernels. The forward writes o
and the base-2 row LSE in exactly the form the Triton forward does, so the custom_vjp can also
hand them to the Triton backward (`MgpuTuning(backward="triton")`), and both backwards share the
Triton module's glue (`vjp_backward`: delta, LSE cotangent, padding, restricted tiles).

CTA layout (FlashAttention-3's, as in JAX's `ops/gpu/attention_mgpu.py`): grid (N, nQ / W, B);
a CTA holds W consecutive 64-row query tiles of one (batch, query head), W = `compute_wgs`
(default 2), with W compute warpgroups and one memory warpgroup.

  memory wg   reads each tile's index list (the restricted selection, `common.block_lists`)
              from global memory one scalar at a time and issues the TMA copies of the selected
              K/V blocks (rows kb * 64 of kv head n // G, and their segment ids) into the
              tile's own ring of `depth` SMEM slots (`tiles.stream_blocks`); a slot is refilled
              once its compute wg has arrived on its "free" barrier.
  compute wg  one query tile: Q by TMA into SMEM, then for t < count: S = Q K^T (wgmma), online
              softmax in base 2 in registers, O += P V (wgmma). Full tiles come first in each
              list and skip the elementwise mask; the masked tail (causal diagonal, window edge,
              ragged last key block, document boundaries) compares positions and ids
              (`tiles.tile_keep`). With W = 2 the two compute wgs ping-pong on a schedule
              barrier (one's softmax overlaps the other's wgmma); a wg whose list is shorter
              keeps meeting the barrier until the longer list ends.

Numerics are the Triton kernel's: a row that has seen only masked keys keeps m = -inf and
subtracts 0, a row with no visible key outputs 0 with internal LSE +inf (the public LSE is
natural-log, -inf there). Scope (ValueError/NotImplementedError otherwise): bf16/fp16,
block_size 64, head_dim 33..128 (zero-padded to 64 or 128), tile selections, no key bias or
BLASST skipping. Ragged T/S are zero-padded to whole tiles like the Triton kernel. The kernels
also run in Mosaic GPU's interpreter on CPU (`interpret=True`, see `tiles`), which is how CI
tests them; compiled they need a Hopper GPU.
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
from pallas_kernels.block_sparse_mgpu import backward, tiles
from pallas_kernels.block_sparse_mgpu.backward import MAX_DEPTH
from pallas_kernels.block_sparse_mgpu.tiles import BLOCK

__all__ = ["MgpuTuning", "block_sparse_attention", "tuning"]

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BACKWARDS = ("mosaic_gpu", "triton")


@dataclasses.dataclass(frozen=True)
class MgpuTuning:
    """compute_wgs: query tiles (compute warpgroups) per CTA of the forward, 1 or 2 (2 ping-pong
    their softmax against each other's wgmma); backward_wgs: tiles per CTA of the backward's two
    kernels (their wgs run independently). depth: forward K/V ring
    slots per compute wg; None = as many as fit in SMEM, at most MAX_DEPTH. backward: which
    kernels differentiate the forward, "mosaic_gpu" (`backward.py`) or "triton" (the Triton
    dq and dk/dv kernels, which also serve GPUs without wgmma)."""

    compute_wgs: int = 2
    depth: int | None = None
    backward: str = "mosaic_gpu"
    backward_wgs: int = 1  # compute wgs per CTA of the Mosaic GPU backward (FA3's default: 1)

    def __post_init__(self):
        for name in ("compute_wgs", "backward_wgs"):
            if getattr(self, name) not in (1, 2):
                raise ValueError(f"{name}={getattr(self, name)}; choose 1 or 2")
        if self.depth is not None and not 2 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth={self.depth}; choose 2..{MAX_DEPTH} or None")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward={self.backward!r}; choose one of {BACKWARDS}")


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
    """Forward K/V ring slots per compute wg: Q tiles, LSE and ids per wg beside the K, V and key
    id blocks of each slot."""
    if tune.depth is not None:
        return tune.depth
    w, tile = tune.compute_wgs, BLOCK * head_dim * itemsize
    return backward.ring_depth(w * (tile + 2 * BLOCK * 4), 2 * tile + BLOCK * 4, w)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Static shape of one forward launch (arrays padded: rows n_rows * 64, keys n_k * 64)."""

    cfg: triton_kernel._Config
    masking: tiles.Masking
    compute_wgs: int
    depth: int
    head_dim: int  # padded: 64 or 128
    n_rows: int  # query tiles, a multiple of compute_wgs
    backward: str
    backward_wgs: int
    interpret: bool


def _attention_kernel(idx_ref, cnt_ref, qid_ref, kid_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, smem, bars, *,
                      lc: _Launch):
    w_count, depth, m = lc.compute_wgs, lc.depth, lc.masking
    dtype = q_ref.dtype
    cta = tiles.QueryTiles.of_cta(idx_ref, cnt_ref, lc.cfg.dims, w_count, lc.n_rows, m.causal)
    batch, head, wg, kv_head = cta.batch, cta.head, cta.wg, cta.kv_head
    tile_of, count, block_index = cta.tile, cta.count, cta.block_index

    def meet_schedule():  # both compute wgs pass here together (a no-op with one)
        if w_count == 2:
            plgpu.barrier_arrive(bars["schedule"])
            plgpu.barrier_wait(bars["schedule"])

    @pl.when(wg < w_count)
    def _compute_wg():
        tiles.claim_registers(w_count)
        w = wg
        row0 = tile_of(w) * BLOCK
        rows = pl.ds(row0, BLOCK)
        n_full, n_all = count(w, 0), count(w, 1)
        q_tile = smem["q"].at[w]
        tiles.load_tiles((("q", q_ref.at[batch, rows, head]),
                          *((("qid", qid_ref.at[batch, rows]),) if m.segmented else ())), smem, bars, w)
        q_ids = tiles.row_vector(smem["qid"].at[w], 0) if m.segmented else None
        stage = smem["stage"].at[w] if lc.interpret else None

        acc = plgpu.layout_cast(jnp.zeros((BLOCK, lc.head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))

        @pl.when(n_all > 0)
        def _():
            plgpu.barrier_wait(bars["k"].at[tiles.ring_slot(w, 0, depth)])

        pl.when(w == 1)(meet_schedule)  # wg 1 starts half a step behind wg 0

        def step(t, carry, *, masked: bool):
            acc, m_i, l_i = carry
            s_ = tiles.ring_slot(w, t, depth)
            if m.segmented:  # every step, so the ids' barrier phases stay in step with K's
                plgpu.barrier_wait(bars["kid"].at[s_])
            if masked:  # read before the wgmma so that its latency hides behind it (ids: before
                col0 = block_index(w, t) * BLOCK  # K's slot, which holds them, is released)
                k_ids = tiles.row_vector(smem["kid"].at[s_], 1) if m.segmented else None
            s = tiles.mma(None, q_tile, smem["k"].at[s_].transpose((1, 0)), during=meet_schedule)
            tiles.release(bars["k_free"], s_, t, n_all, depth)
            s = s * (lc.cfg.scale * LOG2E)
            if masked:
                s = jnp.where(tiles.tile_keep(m, row0, col0, q_ids=q_ids, k_ids=k_ids), s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            # Only a masked tile can leave a row without a visible key (m_new = -inf).
            m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m_i - m_sub)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_sub, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            # As in JAX's FA3 example: keep the softmax before the barrier (ordering matters there).
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            # Softmax done: let the other wg's wgmma run, then take the tensor cores back.
            if w_count == 2:
                plgpu.barrier_arrive(bars["schedule"])
            plgpu.barrier_wait(bars["v"].at[s_])
            if w_count == 2:
                plgpu.barrier_wait(bars["schedule"])

            def wait_next_k():  # while this wgmma runs
                @pl.when(t + 1 < n_all)
                def _():
                    plgpu.barrier_wait(bars["k"].at[tiles.ring_slot(w, t + 1, depth)])

            acc = tiles.mma(acc, p16, smem["v"].at[s_], stage=stage, during=wait_next_k)
            tiles.release(bars["v_free"], s_, t, n_all, depth)
            return acc, m_new, l_i

        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
        if w_count == 2:  # the shorter list keeps meeting the schedule barrier until both end
            n_max = lax.max(count(0, 1), count(1, 1))

            def idle_step(t, _):  # the two barrier meetings of a step of the longer list
                meet_schedule()
                meet_schedule()

            lax.fori_loop(n_all, n_max, idle_step, None)
            pl.when(w == 0)(meet_schedule)

        empty = l_i == 0.0
        l_safe = jnp.where(empty, 1.0, l_i)
        q_tile[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
        smem["lse"].at[w][...] = jnp.where(empty, jnp.inf, m_i + jnp.log2(l_safe))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, rows, head])
        plgpu.copy_smem_to_gmem(smem["lse"].at[w], lse_ref.at[batch, head, rows])
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == w_count)(lambda: tiles.stream_key_blocks(
        block_index, [count(w, 1) for w in range(w_count)], (k_ref, v_ref, kid_ref), batch, kv_head, smem, bars,
        depth, m.segmented))


def _launch(q, k, v, idx, cnt, seg: common.SegmentIds, lc: _Launch):
    """o [B, n_rows * 64, N, D_p] and base-2 LSE [B, N, n_rows * 64] of padded inputs."""
    w, depth, dh = lc.compute_wgs, lc.depth, lc.head_dim
    b, _, n, _ = q.shape
    smem = {"q": tiles.smem_tiles((w, BLOCK, dh), q.dtype),  # Q, then the output tile
            "k": tiles.smem_tiles((w * depth, BLOCK, dh), k.dtype),
            "v": tiles.smem_tiles((w * depth, BLOCK, dh), v.dtype),
            "lse": plgpu.SMEM((w, BLOCK), jnp.float32), "qid": plgpu.SMEM((w, BLOCK), jnp.int32),
            "kid": plgpu.SMEM((w * depth, BLOCK), jnp.int32)}
    if lc.interpret:  # the P tile of each wg, staged for the interpreter's wgmma
        smem["stage"] = tiles.smem_tiles((w, BLOCK, BLOCK), q.dtype)
    bars = {"q": plgpu.Barrier(num_barriers=w), "qid": plgpu.Barrier(num_barriers=w),
            **{name: plgpu.Barrier(num_barriers=w * depth) for name in ("k", "v", "kid")},
            **{name: plgpu.Barrier(num_arrivals=1, num_barriers=w * depth) for name in ("k_free", "v_free")},
            "schedule": plgpu.Barrier(num_arrivals=w)}  # ping-pong; unused when w == 1
    return tiles.launch(
        functools.partial(_attention_kernel, lc=lc),
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, q.shape[1]), jnp.float32)),
        grid=(n, lc.n_rows // w, b), grid_names=("heads", "q_tiles", "batch"), compute_wgs=w,
        scratch=(smem, bars), interpret=lc.interpret)(idx, cnt, seg.q, seg.kv, q, k, v)


def _fwd_impl(q, k, v, block_mask, seg, lc: _Launch):
    """(o, natural LSE [B, N, T], base-2 LSE [B, N, nQ * 64] as the backward wants it)."""
    cfg = lc.cfg
    d = cfg.dims
    mask, full = triton_kernel._restricted(block_mask, seg, cfg)
    idx, cnt = common.block_lists(mask, full)
    # Extra query tiles (to fill the last CTA) get empty lists: zero counts, never-read indices.
    idx, cnt = (common.pad_axis(x, 2, lc.n_rows) for x in (idx, cnt))
    rows = lc.n_rows * BLOCK
    qp = triton_kernel._pad(q, rows, lc.head_dim)
    kp, vp = (triton_kernel._pad(x, d.n_k * BLOCK, lc.head_dim) for x in (k, v))
    ids = triton_kernel._padded_ids(seg, cfg)
    ids = common.SegmentIds(common.pad_axis(ids.q, 1, rows), ids.kv)
    o, lse2 = _launch(qp, kp, vp, idx, cnt, ids, lc)
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
    # The Triton forward's residuals, with its (unread) key-bias placeholder.
    return (o, lse), (q, k, v, block_mask, seg, triton_kernel.no_bias(lc.cfg.dims), o, lse2)


def _mgpu_backward(lc: _Launch, q, k, v, do, lse2, delta, mask, full, seg, bias2, cfg):
    """`triton_kernel._backward`'s signature on the Mosaic GPU kernels (no key bias)."""
    d = cfg.dims
    w = lc.backward_wgs
    lb = backward.BackwardLaunch(d, lc.masking, cfg.scale, w, lc.head_dim, n_q_rows=-(-d.n_q // w) * w,
                                 n_k_rows=-(-d.n_k // w) * w, interpret=lc.interpret)
    return (*backward.backward(q, k, v, do, lse2, delta, mask, full, seg, lb), None)


def _attention_bwd(lc: _Launch, res, cotangents):
    # The shared glue takes (and ignores) the cotangents of the fused block scores and skips.
    kernels = (functools.partial(_mgpu_backward, lc) if lc.backward == "mosaic_gpu"
               else triton_kernel._backward)
    return triton_kernel.vjp_backward(lc.cfg, res, (*cotangents, None, None), kernels)[:5]


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_scope(q, dims: common.Dims) -> None:
    """Values outside what the kernels take: ValueError naming the field."""
    if jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"dtype={q.dtype}: the mosaic_gpu kernels take bfloat16 or float16")
    if dims.block != BLOCK:
        raise ValueError(f"block_size={dims.block}: the mosaic_gpu kernels take block_size={BLOCK}")
    if not 32 < dims.head_dim <= 128:
        raise ValueError(f"head_dim={dims.head_dim}: the mosaic_gpu kernels take 33..128 "
                         "(zero-padded to 64 or 128)")


def block_sparse_attention(q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None,
                           segment_ids=None, window=None, key_bias=None, skip_threshold=None, interpret=False,
                           return_lse=False, return_skipped=False):
    """Softmax attention restricted to the selected blocks, forward and backward on Mosaic GPU.

    Same contract as `pallas_kernels.block_sparse.reference.block_sparse_attention` within this
    scope: q [B, T, N, D], k/v [B, S, K, D] (N a multiple of K), bf16 or fp16, 32 < D <= 128;
    block_mask bool [B, H, nQ, nK] (H = K or N) or a tile `Selection`; block_size 64; causal
    end-aligned; segment_ids and window as the reference; key_bias and skip_threshold raise
    NotImplementedError (the Triton kernel has them). interpret=True runs the kernels in Mosaic
    GPU's interpreter (CPU, slow: small shapes). Returns o [B, T, N, D] in q's dtype (and the
    natural-log LSE f32 [B, N, T], -inf for rows with no visible key, whose output is 0).
    Differentiable in q, k, v (and through the LSE) by `backward.py`'s kernels, or the Triton
    backward with `MgpuTuning(backward="triton")`. Compiled, it needs a Hopper GPU.
    """
    common.reject_bias_and_skip("mosaic_gpu", key_bias, skip_threshold, return_skipped)
    if isinstance(block_mask, Selection):
        if block_mask.granularity == "token":
            raise NotImplementedError("token-level selections are not supported by the mosaic_gpu "
                                      "kernels; use impl='pallas'")
        block_mask = block_mask.to_mask()
    dims = common.attention_dims(q, k, v, block_mask, block_size)
    _check_scope(q, dims)
    seg, cfg = triton_kernel._checked_call(q, k, v, block_mask, causal=causal, block_size=block_size,
                                           sm_scale=sm_scale, segment_ids=segment_ids, window=window,
                                           interpret=bool(interpret))
    tune = _TUNING.get()
    head_dim = common.padded_head_dim(dims.head_dim)
    masking = tiles.Masking(dims.seq_kv, dims.offset, cfg.causal, cfg.window, cfg.segmented)
    lc = _Launch(cfg, masking, tune.compute_wgs, ring_depth(tune, head_dim, q.dtype.itemsize), head_dim,
                 n_rows=-(-dims.n_q // tune.compute_wgs) * tune.compute_wgs, backward=tune.backward,
                 backward_wgs=tune.backward_wgs, interpret=bool(interpret))
    o, lse = _attention(q, k, v, block_mask, seg, lc)
    return (o, lse) if return_lse else o
