"""Pieces every Mosaic GPU kernel body here shares: the tensor-core product, the elementwise mask
of a 64 x 64 tile, the memory warpgroup's TMA stream over an index list, and the launch.

Interpret mode (`plgpu.InterpretGPUParams`, CPU) runs the same bodies with two differences that
`mma` hides: its wgmma reads the A operand from shared memory only (register operands are staged
through an SMEM tile), and it has no rule for accumulators carried through `pl.run_state`, so a
product into a running accumulator is computed fresh and added. Compiled kernels keep A in
registers and accumulate in place, as FlashAttention-3 does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.state import types as state_types

# The elementwise rule of a masked tile, shared with the Triton kernels.
from pallas_kernels.block_sparse.kernel import visible

BLOCK = 64  # query tile = key tile = selection block (one wgmma M of 64 rows per compute wg)
# 128-byte swizzle: a 16-bit row of 64 elements per swizzle atom (as the wgmma operands want).
TILE_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class QueryTiles:
    """Where a CTA of the kernels that walk query tiles' lists (forward, dq) sits: grid axes
    ("heads", "q_tiles", "batch", and "wg" for the warpgroup) and its W tiles' lists."""

    batch: jax.Array
    head: jax.Array
    wg: jax.Array
    mask_head: jax.Array
    kv_head: jax.Array
    group: jax.Array  # the CTA's tiles are group * W + w
    compute_wgs: int
    idx_ref: object
    cnt_ref: object

    @classmethod
    def of_cta(cls, idx_ref, cnt_ref, dims, compute_wgs: int, n_rows: int, causal: bool) -> "QueryTiles":
        head, group = lax.axis_index("heads"), lax.axis_index("q_tiles")
        if causal:  # causal rows grow with the tile index: launch the longest first
            group = n_rows // compute_wgs - 1 - group
        return cls(lax.axis_index("batch"), head, lax.axis_index("wg"), lax.div(head, jnp.int32(dims.mask_group)),
                   lax.div(head, jnp.int32(dims.group)), group, compute_wgs, idx_ref, cnt_ref)

    def tile(self, w):
        return self.group * self.compute_wgs + w

    def count(self, w, which: int):  # which = 0: full tiles (the prefix), 1: all tiles
        return self.cnt_ref[self.batch, self.mask_head, self.tile(w), which]

    def block_index(self, w, t):
        return self.idx_ref[self.batch, self.mask_head, self.tile(w), t]


def smem_tiles(shape, dtype):
    """SMEM for wgmma operand tiles [..., 64, D]."""
    return plgpu.SMEM(shape, dtype, transforms=TILE_TRANSFORMS)


def is_ref(x) -> bool:
    """A (possibly sliced or transposed) memory ref, as opposed to a value in registers."""
    return isinstance(x, state_types.TransformedRef) or isinstance(getattr(x, "aval", None), state_types.AbstractRef)


def mma(acc, a, b, *, stage=None, during: Callable[[], None] | None = None):
    """acc + a @ b in f32 on the tensor cores (acc None: a fresh [M, N] product).

    a: an SMEM ref, or a register array (16-bit) when `stage` is None; with `stage` (an SMEM tile
    ref, interpret mode) a register operand is written there first. `during` runs while the
    product is in flight (e.g. waiting for the next block's copy).
    """
    m, n = a.shape[0], b.shape[1]
    interpret = stage is not None
    if interpret and not is_ref(a):
        stage[...] = a
        plgpu.commit_smem()
        a = stage

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if during is not None:
            during()
        return acc_ref[...]

    if acc is None or interpret:
        fresh = pl.run_scoped(product, plgpu.ACC((m, n), jnp.float32))
        return fresh if acc is None else acc + fresh

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if during is not None:
            during()

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


@dataclasses.dataclass(frozen=True)
class Masking:
    """What a masked tile compares (static): positions (real keys, causal, window) and ids."""

    seq_kv: int
    offset: int  # seq_kv - seq_q: causality is aligned at the end
    causal: bool
    window: int | None
    segmented: bool


def tile_keep(m: Masking, q0, k0, *, keys_as_rows: bool = False, q_ids=None, k_ids=None):
    """bool [64, 64] in the WGMMA layout: the visible (query, key) pairs of the tile whose first
    query row is q0 and first key k0. Rows are queries (or keys, `keys_as_rows`, the dk/dv
    kernel's transposed tiles). q_ids / k_ids (segmented only): the tile's ids along their axis,
    loaded in the matching `WGMMA.reduce` layout."""
    i = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=plgpu.Layout.WGMMA)
    j = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=plgpu.Layout.WGMMA)
    q_axis, k_axis = (1, 0) if keys_as_rows else (0, 1)
    q_pos, k_pos = (j + q0, i + k0) if keys_as_rows else (i + q0, j + k0)
    same_doc = None
    if m.segmented:
        shape = (BLOCK, BLOCK)
        same_doc = lax.broadcast_in_dim(q_ids, shape, [q_axis]) == lax.broadcast_in_dim(k_ids, shape, [k_axis])
    return visible(q_pos, k_pos, causal=m.causal, offset=m.offset, seq_kv=m.seq_kv, window=m.window,
                   same_doc=same_doc)


def row_vector(ref, rows_axis: int):
    """A [64] vector from SMEM in the layout of a WGMMA tile's rows (0) or columns (1)."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1 - rows_axis))


@dataclasses.dataclass(frozen=True)
class Stream:
    """One operand the memory warpgroup copies each step into a ring slot.

    src(w, t): the GMEM block of compute wg w's step t; dst: SMEM [W * depth, ...]; ready:
    barriers [W * depth] the copy completes on; free: barriers [W * depth] the compute wg arrives
    on when done with the slot, or None when the slot is released with an earlier stream's.
    """

    src: Callable
    dst: object
    ready: object
    free: object | None


def ring_slot(w, t, depth: int):
    """Ring slot of compute wg w's step t: each wg owns `depth` consecutive slots."""
    return w * depth + lax.rem(t, jnp.int32(depth))


def release(free, slot, t, n, depth: int) -> None:
    """The compute wg is done with ring slot `slot` of its step t of n: arrive on its free barrier
    when a later step will refill it. The last `depth` steps do not arrive: no barrier phase may
    complete that its waiter never sees (the interpreter checks this when the kernel ends)."""
    @pl.when(t + depth < n)
    def _():
        plgpu.barrier_arrive(free.at[slot])


def stream_blocks(n_steps: Sequence, streams: Sequence[Stream], depth: int) -> None:
    """The memory warpgroup's loop: the compute wgs' steps in lockstep (they advance at one
    pace), each copy issued once its slot's step t - depth has been released (`release`)."""
    @pl.loop(0, functools.reduce(lax.max, n_steps))
    def _(t):
        for w, n in enumerate(n_steps):
            @pl.when(t < n)
            def _():
                slot = ring_slot(w, t, depth)
                for s in streams:
                    if s.free is not None:
                        @pl.when(t >= depth)
                        def _():
                            plgpu.barrier_wait(s.free.at[slot])
                    plgpu.copy_gmem_to_smem(s.src(w, t), s.dst.at[slot], s.ready.at[slot])


def load_tiles(sources, smem, bars, w) -> None:
    """Copies each (name, GMEM block) into smem[name].at[w] and waits for all of them."""
    for name, src in sources:
        plgpu.copy_gmem_to_smem(src, smem[name].at[w], bars[name].at[w])
    for name, _ in sources:
        plgpu.barrier_wait(bars[name].at[w])


def stream_key_blocks(block_index, n_steps: Sequence, refs, batch, kv_head, smem, bars, depth: int,
                      segmented: bool) -> None:
    """The memory wg of the kernels that walk query tiles' lists (forward, dq): K and V blocks
    (and their segment ids, released with K) of kv head `kv_head` at rows block_index(w, t) * 64."""
    yield_registers(len(n_steps))
    k_ref, v_ref, kid_ref = refs

    def keys(w, t):
        return pl.ds(block_index(w, t) * BLOCK, BLOCK)

    streams = [Stream(lambda w, t: k_ref.at[batch, keys(w, t), kv_head], smem["k"], bars["k"], bars["k_free"]),
               Stream(lambda w, t: v_ref.at[batch, keys(w, t), kv_head], smem["v"], bars["v"], bars["v_free"])]
    if segmented:
        streams.append(Stream(lambda w, t: kid_ref.at[batch, keys(w, t)], smem["kid"], bars["kid"], None))
    stream_blocks(n_steps, streams, depth)


def claim_registers(compute_wgs: int) -> None:
    """Compute wg side of the register split: with 2 compute wgs (3 wgs of 128 threads, 170
    registers each by default) the memory wg gives its registers to the compute wgs."""
    if compute_wgs == 2:
        plgpu.set_max_registers(232, action="increase")


def yield_registers(compute_wgs: int) -> None:
    """Memory wg side of `claim_registers`."""
    if compute_wgs == 2:
        plgpu.set_max_registers(40, action="decrease")


def launch(body, *, out_type, grid, grid_names, compute_wgs: int, scratch, interpret: bool):
    """plgpu.kernel with W compute warpgroups and one memory warpgroup (the last), compiled or in
    the GPU interpreter."""
    return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=compute_wgs + 1,
                        thread_name="wg", scratch_types=scratch,
                        compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=plgpu.InterpretGPUParams() if interpret else None)
