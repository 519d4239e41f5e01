"""InfLLM-V2's stage 1 (and NSA's block importance), fused (Pallas Triton lowering): every token's
score of every key block from compressed keys, without materialising the [T, nW] window scores (which at T=32k cost more than
the sparse attention they select for, measured in docs/benchmarks.md).

Grid (nQ, B, K): one query tile of `block_size` tokens and one KV head. The G query heads of the
group are G operands (Triton tiles are powers of two, G need not be):
  pass 1  per head, the base-2 LSE of the logits over the coarse windows each token has seen
          (online, W2 windows per step, only the steps holding windows the tile can see);
  pass 2  per step, the fine windows of M key blocks: P = sum over the heads of exp2(s - lse),
          zero where unseen; each block's max (or overlap-weighted sum) over the windows
          overlapping it (the windows before the step's first block are carried from the previous
          step); one output row per block.
Output f32 [B, K, nK, T] (block-major, so each store is one contiguous row), steps up to the
tile's own block; the later blocks, which no window a token has seen overlaps, are zeroed outside.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.block_sparse.common import LOG2E, pad_axis, padded_head_dim
from pallas_kernels.block_sparse.launch import dot_precision, pallas
from pallas_kernels.compressed_scores.common import Windows, check, overlap_weight

COARSE_STEP = 64    # coarse windows per pass-1 step
FINE_STEP = 64      # fine windows per pass-2 step (at least; a whole number of blocks)


def _kernel(*refs, group: int, w: Windows, blocks_per_step: int, n_coarse: int, scale: float, pool: str,
            precision):
    q_refs, (doc_ref, fine_ref, coarse_ref, out_ref) = refs[:group], refs[group:]
    bq, r, u = w.block, w.per_block, w.per_window
    i = pl.program_id(0)
    rows = i * bq + jnp.arange(bq)
    first = doc_ref[...][:, None]     # each token's document start: earlier windows are not its own
    qs = [q_ref[...] for q_ref in q_refs]

    def logits(q, keys):   # base 2
        return pltr.dot(q, keys, trans_b=True, precision=precision).astype(jnp.float32) * (scale * LOG2E)

    def lse_step(t, carry):
        start = pl.multiple_of(t * COARSE_STEP, COARSE_STEP)
        keys = coarse_ref[pl.ds(start, COARSE_STEP), :]
        window_start = (start + jnp.arange(COARSE_STEP))[None, :] * w.coarse_stride
        seen = (window_start + w.coarse_size - 1 <= rows[:, None]) & (window_start >= first)
        out = []
        for q, (m, l) in zip(qs, carry):
            s = jnp.where(seen, logits(q, keys), -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            out.append((m_new, l * jnp.exp2(m - m_sub) + jnp.exp2(s - m_sub[:, None]).sum(axis=1)))
        return tuple(out)

    last_row = i * bq + bq - 1
    n_seen = jnp.clip((last_row - w.coarse_size + 1) // w.coarse_stride + 1, 0, n_coarse)
    init = tuple((jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32)) for _ in qs)
    stats = lax.fori_loop(0, pl.cdiv(n_seen, COARSE_STEP), lse_step, init)
    # +inf where no coarse window is seen yet: those tokens score 0 everywhere.
    lses = [jnp.where(l == 0.0, jnp.inf, m + jnp.log2(jnp.where(l == 0.0, 1.0, l))) for m, l in stats]

    width = r * blocks_per_step
    cols = jnp.arange(width)

    def score_step(t, carry):
        start = pl.multiple_of(t * width, width)
        keys = fine_ref[pl.ds(start, width), :]
        window_start = (start + cols)[None, :] * w.stride
        seen = (window_start + w.size - 1 <= rows[:, None]) & (window_start >= first)
        p = sum(jnp.exp2(logits(q, keys) - lse[:, None]) for q, lse in zip(qs, lses))
        p = jnp.where(seen, p, 0.0)
        for m in range(blocks_per_step):
            lo, hi = r * m - u + 1, r * m + r - 1     # the windows overlapping block m of the step
            inside = ((cols >= lo) & (cols <= hi))[None, :]
            if pool == "max":
                score = jnp.where(inside, p, 0.0).max(axis=1)
                score = jnp.maximum(score, carry) if lo < 0 else score
            else:
                score = jnp.where(inside, p * overlap_weight(cols - r * m, w)[None, :], 0.0).sum(axis=1)
                score = score + carry if lo < 0 else score
            out_ref[t * blocks_per_step + m, :] = score
        # The windows of this step that overlap the next step's first block.
        tail = (cols > width - u)[None, :]
        if pool == "max":
            return jnp.where(tail, p, 0.0).max(axis=1)
        return jnp.where(tail, p * overlap_weight(cols - width, w)[None, :], 0.0).sum(axis=1)

    lax.fori_loop(0, i // blocks_per_step + 1, score_step, jnp.zeros((bq,), jnp.float32))


def token_block_scores(q, fine, coarse, *, block_size, kernel_size, kernel_stride, coarse_size,
                       coarse_stride, doc_start=None, sm_scale=None, query_chunk=512, pool="max",
                       interpret=False):
    """Per query token and KV head, each key block's InfLLM-V2 (or NSA) score: f32 [B, K, T, nK].

    q: [B, T, N, D] post-RoPE queries at positions 0..T-1; fine: [B, nW, K, D] the means of the
    post-RoPE keys over the complete windows of `kernel_size` at `kernel_stride`; coarse: [B, nW2,
    K, D] the same over `coarse_size` at `coarse_stride`. Token t's score of fine window c is the sum
    over its GQA group of exp(q . fine_c * scale - lse), lse the log-sum-exp of its logits over the
    coarse windows it has seen (0 everywhere if none); windows count once ended by t and, with
    doc_start (int32 [B, T], the first token of each token's document in packed rows), only when
    they start inside its document. A block scores, with pool="max" (InfLLM-V2), the max over the
    windows overlapping it; with pool="overlap" (NSA, coarse = fine), the sum over those windows,
    each weighted by the stride-chunks it shares with the block (`common.overlap_weight`). Blocks
    after the token's score 0. Not differentiable (a selection). `query_chunk` is the
    reference's memory bound (the kernel tiles queries by block); `interpret`: Pallas interpreter.
    """
    del query_chunk
    w = Windows(block_size, kernel_size, kernel_stride, coarse_size, coarse_stride)
    check(q, fine, coarse, w, doc_start, pool)
    b, t, n, d = q.shape
    kv, group = fine.shape[2], n // fine.shape[2]
    n_k = -(-t // block_size)
    blocks_per_step = max(1, FINE_STEP // w.per_block)
    n_steps = (n_k - 1) // blocks_per_step + 1
    dh = padded_head_dim(d)
    qp = pad_axis(pad_axis(q, 1, n_k * block_size), 3, dh)
    fine_p = pad_axis(pad_axis(fine.astype(q.dtype), 1, n_steps * blocks_per_step * w.per_block), 3, dh)
    n_coarse = coarse.shape[1]
    coarse_p = pad_axis(pad_axis(coarse.astype(q.dtype), 1, max(1, -(-n_coarse // COARSE_STEP)) * COARSE_STEP), 3, dh)
    doc_start = jnp.zeros((b, t), jnp.int32) if doc_start is None else doc_start
    doc_p = pad_axis(doc_start, 1, n_k * block_size)
    q_specs = [pl.BlockSpec((None, block_size, None, dh), lambda i, bb, h, g=g: (bb, i, h * group + g, 0))
               for g in range(group)]
    key_spec = lambda x: pl.BlockSpec((None, x.shape[1], None, dh), lambda i, bb, h: (bb, 0, h, 0))  # noqa: E731
    rows = n_steps * blocks_per_step
    kernel = functools.partial(_kernel, group=group, w=w, blocks_per_step=blocks_per_step, n_coarse=n_coarse,
                               scale=1.0 / math.sqrt(d) if sm_scale is None else sm_scale, pool=pool,
                               precision=dot_precision(q.dtype))
    doc_spec = pl.BlockSpec((None, block_size), lambda i, bb, h: (bb, i))
    out = pallas(kernel, grid=(n_k, b, kv), in_specs=[*q_specs, doc_spec, key_spec(fine_p), key_spec(coarse_p)],
                 out_specs=pl.BlockSpec((None, None, rows, block_size), lambda i, bb, h: (bb, h, 0, i)),
                 out_shape=jax.ShapeDtypeStruct((b, kv, rows, n_k * block_size), jnp.float32),
                 warps=4, stages=2, interpret=interpret, name="infllm_v2_block_scores")(
        *[qp] * group, doc_p, fine_p, coarse_p)
    out = out[:, :, :n_k, :t].swapaxes(2, 3)
    # Blocks after a token's own: unwritten by the kernel, and 0 by definition (no seen window overlaps).
    own = jnp.arange(n_k)[None, :] * block_size <= jnp.arange(t)[:, None]
    return jnp.where(own, out, 0.0)
