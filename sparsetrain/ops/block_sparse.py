"""Public block-sparse attention ops: one dispatch between the Pallas kernels and their references.

Arrays in, arrays out: no config, no model. Shapes use B batch, T query length, S key length,
N query heads, K kv heads, D head dim, bs block size, nQ = ceil(T/bs), nK = ceil(S/bs).
Validation (shapes, dtypes, head counts, block size) raises ValueError before anything runs.
"""

from __future__ import annotations

import jax

import pallas_kernels.block_sparse_mgpu as _mgpu
import pallas_kernels.block_sparse_tpu as _tpu
from pallas_kernels.block_sparse import kernel as _kernel
from pallas_kernels.block_sparse import reference as _reference
from pallas_kernels.block_sparse import scores as _scores
from sparsetrain.ops.platform import kernel_backend


def _no_tpu_fused_kernel(*args, **kwargs):
    raise NotImplementedError(
        "attention_with_block_scores has no TPU kernel (its fused forward is Triton only); call "
        "block_sparse_attention and block_attention_scores separately, or use impl='xla'")


# backend -> (attention, block scores, attention with block scores); each shares the reference's
# signature.
_BACKENDS = {
    "reference": (_reference.block_sparse_attention, _reference.block_attention_scores,
                  _reference.attention_with_block_scores),
    "triton": (_kernel.block_sparse_attention, _scores.block_attention_scores,
               _kernel.attention_with_block_scores),
    "tpu": (_tpu.block_sparse_attention, _tpu.block_attention_scores, _no_tpu_fused_kernel),
    # Mosaic GPU attention (forward and backward); the scores and the fused pair stay on Triton.
    "mosaic_gpu": (_mgpu.block_sparse_attention, _scores.block_attention_scores,
                   _kernel.attention_with_block_scores),
}



def block_sparse_attention(q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None,
                           segment_ids=None, window=None, key_bias=None, skip_threshold=None, impl="auto",
                           interpret=None, return_lse=False, return_skipped=False):
    """Softmax attention restricted to the selected (query block, key block) tiles.

    Args:
      q: [B, T, N, D]; k, v: [B, S, K, D]. GQA: N a multiple of K, query heads
        i*G..(i+1)*G-1 (G = N // K) read kv head i; K/V are never repeated in memory.
      block_mask: bool [B, H, nQ, nK] with H = K (one selection per GQA group, as NSA/InfLLM-V2)
        or H = N (per query head, as SeerAttention prefill). True = compute that tile. Or a
        `Selection` (sorted index lists with counts) of either granularity:
        "tile": the same [B, H, nQ] rows as lists (the Triton kernel turns them into its loop
        lists); "token": one list per query token, indices int32 [B, H, T, m] ascending, counts
        [B, H, T], shared by the N // H query heads of a selection head (NSA / InfLLM-V2 with
        H = K). A token sees the keys of its blocks at or before its position. The Triton token
        kernel tiles G heads x P tokens (P = 16 // G when G < 16; N // H a power of two); the
        TPU kernel takes tile selections only. Index values (range, order, counts) are checked
        when they are concrete (not under jit): ValueError naming the field.
      causal: also hide keys after the query position, aligned at the end when S > T (query row
        i sits at position i + S - T).
      block_size: bs, one of 16, 32, 64, 128; T and S need not be multiples of it.
      sm_scale: logit scale, default 1/sqrt(D).
      segment_ids: document masking for packed sequences. None (no masking); int [B, T] when
        S == T (self-attention: one id per token); or `SegmentIds(q=[B, T], kv=[B, S])`. A query
        sees a key only when their ids are equal, on top of causality and the selection. The
        Triton kernel skips tiles between two documents and compares ids only in tiles that
        cross a boundary; the TPU kernel raises NotImplementedError.
      window: sliding window (NSA's window branch): None (off) or an int w >= 1, causal only
        (ValueError otherwise). A query at position p sees key s only when p - w < s <= p, on top
        of the selection and segment ids; w >= S is the same as None. The band of tiles that can
        hold such pairs is `window_block_mask(T, S, bs, w)`: pass it (or a subset) as block_mask
        to keep the lists short. The Triton kernel skips selected tiles below every row's window,
        runs tiles inside the band unmasked and compares positions only in tiles crossing the
        window's lower edge (or the diagonal); the TPU kernel raises NotImplementedError.
      key_bias: None, or float [B, K, S]: an additive bias per kv head and key, added to the
        scaled logits of every query head of that kv head's group (DMA's and NOSA's learned key
        scores). Differentiable: its gradient is the row sum of dS over the group's queries,
        written by the dk/dv kernel. Tile selections on the Triton kernel and the reference only
        (NotImplementedError for token selections, "pallas_tpu" and "mosaic_gpu").
      skip_threshold: BLASST (arXiv 2512.12087): None (off) or lambda in [0, 1). Inside the flash
        loop a tile whose every row has exp(tile max - running max) < lambda is skipped (no exp, no
        V load, no PV product); the forward records its decisions and the backward skips the same
        tiles, so gradients are exact for the function the forward computed. 0 skips nothing.
        Tile selections on the Triton kernel and the reference only (which replays the kernel's
        loop order); the decisions depend on that order.
      impl: "auto" | "pallas" | "pallas_tpu" | "mosaic_gpu" | "xla" (see
        `sparsetrain.ops.platform.kernel_backend`; the TPU kernel takes block_size 128 only of
        these). "mosaic_gpu" (opt-in, Hopper GPU; in its interpreter with interpret=True): the
        Mosaic GPU forward and backward, for tile selections, bf16/fp16, block_size 64, head_dim
        33..128, with segment_ids and window, without key_bias or skip_threshold
        (NotImplementedError). interpret: None = True off the kernel's own platform ("mosaic_gpu":
        False).
      return_lse: also return the natural-log log-sum-exp of each row's scaled logits over its
        visible keys, f32 [B, N, T]; -inf for rows with no visible key.
      return_skipped: also return the tiles BLASST skipped, bool [B, N, nQ, nK] (all False
        without skip_threshold), for the skipped-fraction metric.
    Returns:
      o [B, T, N, D] in q's dtype, exactly softmax attention over the visible keys (outside the
      skipped tiles); rows with no visible key are 0 (never NaN). With return_lse, (o, lse); with
      return_skipped, the skipped tiles last. Differentiable in q, k, v (and
      through lse) and in key_bias; the mask gets no gradient.
    """
    backend, interpret = kernel_backend(impl, interpret)
    fn = _BACKENDS[backend][0]
    return fn(q, k, v, block_mask, causal=causal, block_size=block_size, sm_scale=sm_scale,
              segment_ids=segment_ids, window=window, key_bias=key_bias, skip_threshold=skip_threshold,
              interpret=interpret, return_lse=return_lse, return_skipped=return_skipped)


def block_attention_scores(q, k, *, block_size=64, causal=True, sm_scale=None, segment_ids=None,
                           impl="auto", interpret=None):
    """SeerAttention's block ground truth: f32 [B, N, nQ, nK].

    For each query head, the 2-D max-pool over every (query block, key block) tile of the dense
    (causal, end-aligned) softmax map, then row-normalised to sum to 1 over key blocks. Tiles with
    no visible pair are 0; so are rows with no visible key. The Pallas version runs two flash-style
    passes (row LSE, then tile maxima of exp(s - lse)) and never materialises [T, S].
    q: [B, T, N, D]; k: [B, S, K, D]. segment_ids as in `block_sparse_attention` (the map of
    each document alone). Not differentiable (a distillation target).
    """
    backend, interpret = kernel_backend(impl, interpret)
    fn = _BACKENDS[backend][1]
    # Cut gradients at the inputs so autodiff never traces into the kernels.
    q, k = jax.lax.stop_gradient((q, k))
    return fn(q, k, block_size=block_size, causal=causal, sm_scale=sm_scale, segment_ids=segment_ids,
              interpret=interpret)


def attention_with_block_scores(q, k, v, *, block_size=64, causal=True, sm_scale=None, segment_ids=None,
                                impl="auto", interpret=None):
    """Dense (causal) attention and its block ground truth in one call: (o, scores).

    o [B, T, N, D] is `block_sparse_attention` over every tile (exact dense attention, within
    documents with segment_ids), differentiable in q, k, v; scores f32 [B, N, nQ, nK] are
    `block_attention_scores(q, k, ...)` of the same map, without gradient. The Triton kernel gets
    the scores from the attention forward itself (each row's maximum logit per key block,
    `4 * B * N * nK * nQ*bs` bytes while the call runs, combined with the final LSE in XLA) instead
    of two extra passes; the reference composes the two references; the TPU backend raises
    NotImplementedError. Arguments as `block_sparse_attention`.
    """
    backend, interpret = kernel_backend(impl, interpret)
    fn = _BACKENDS[backend][2]
    o, scores = fn(q, k, v, block_size=block_size, causal=causal, sm_scale=sm_scale, segment_ids=segment_ids,
                   interpret=interpret)
    return o, jax.lax.stop_gradient(scores)
