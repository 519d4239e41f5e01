"""Dense causal attention: cuDNN flash attention on GPU, XLA elsewhere (the reference); packed
documents masked by segment ids (sparsetrain/attention/documents.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsetrain.attention.documents import document_block_mask, same_document
from sparsetrain.attention.context_parallel import context_size
from sparsetrain.attention.sharded import block_sparse_attention, causal_attention
from sparsetrain.ops.platform import dense_impl, on_gpu
from sparsetrain.ops.selection import causal_block_mask

# Tile of the block-sparse kernel when it runs masked dense attention (bs 64 has the faster backward).
DOCUMENT_TILE = 64


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
                           impl: str = "auto") -> jax.Array:
    """Causal softmax attention with GQA, within documents when `segment_ids` are given.

    q: [B, T, N, H]; k, v: [B, T, K, H] with N a multiple of K (query heads j*G..(j+1)*G-1 use kv head
    j, as in Hugging Face `repeat_kv`). Scale is H**-0.5. segment_ids: int [B, T] or None; a query
    sees only keys of its own id, each id a contiguous run. Returns [B, T, N, H] in q's dtype.

    How masked documents run: "auto" on a GPU uses our block-sparse kernel over the tiles that
    hold a same-document pair (`document_block_mask`), with the segment ids masking inside the
    boundary tiles. cuDNN with an explicit mask runs 3-4x slower than its is_causal path, and its
    packed layout (`q_offsets`/`kv_offsets` with per-document lengths) is reachable only through
    jax's private `jax._src.cudnn.fused_attention_stablehlo`, needs Hopper, and takes the offsets
    as a [B, M + 1] array, so M, the most documents a row may hold, must be fixed when tracing.
    The kernel needs none of that, computes no tile that lies entirely across documents (short
    documents make masked attention cheaper than causal), and is the kernel the sparse methods
    already run; at full density it measured 1.46-1.77x cuDNN's causal time (issue 10), against
    3-4x for cuDNN with a mask. XLA (CPU, or impl="xla"/"cudnn" asked explicitly) takes the
    explicit [B, 1, T, T] mask.
    """
    if context_size() > 1:
        # A method's dense branch (Seer's distillation, InfLLM-V2 below dense_len, SSA's full
        # output) in natural order on a context split: per device, its load-balanced query chunks.
        return causal_attention(q, k, v, segment_ids=segment_ids, layout="natural")
    backend = dense_impl(impl, q.dtype)
    if segment_ids is None:
        # No mask here: cuDNN with an explicit mask runs 3-4x slower than is_causal.
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=backend)
    if impl == "auto" and on_gpu():
        return document_tiles_attention(q, k, v, segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=same_document(segment_ids)[:, None], is_causal=True,
                                        implementation=backend)


def document_tiles_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                             impl: str = "auto") -> jax.Array:
    """Masked dense attention through the block-sparse kernel: every tile that holds a pair of the
    same document, with the segment ids masking inside the tiles on a boundary. Same arguments and
    result as `dense_causal_attention`; impl as for `sparsetrain.ops.block_sparse_attention`."""
    tiles = document_block_mask(segment_ids, DOCUMENT_TILE)[:, None]                 # [B, 1, nQ, nK]
    tiles = jnp.broadcast_to(tiles, (tiles.shape[0], k.shape[2], *tiles.shape[2:]))  # one per kv head
    return block_sparse_attention(q, k, v, tiles, segment_ids=segment_ids, causal=True,
                                  block_size=DOCUMENT_TILE, impl=impl)


class DenseAttention(nnx.Module):
    """Parameter-free attention layer for `method="dense"`; with `skip_threshold`, BLASST."""

    def __init__(self, impl: str, skip_threshold: float | None = None):
        self.impl, self.skip_threshold = impl, skip_threshold

    def __call__(self, inp) -> jax.Array:
        if self.skip_threshold is None:
            return dense_causal_attention(inp.q, inp.k, inp.v, segment_ids=inp.segment_ids, impl=self.impl)
        return self.skipping_attention(inp)

    def skipping_attention(self, inp) -> jax.Array:
        """The block-sparse kernel over every causal (same-document) tile with BLASST's skip,
        reporting the share of tiles it skipped when a caller collects metrics."""
        # Imported here: method.py imports this module.
        from sparsetrain.attention.method import AuxMetric, skipped_share
        b, seq, kv = inp.q.shape[0], inp.q.shape[1], inp.k.shape[2]
        tiles = (causal_block_mask(seq, seq, DOCUMENT_TILE) if inp.segment_ids is None
                 else document_block_mask(inp.segment_ids, DOCUMENT_TILE)[:, None])
        tiles = jnp.broadcast_to(tiles, (b, kv, *tiles.shape[-2:]))               # one per kv head
        out, skipped = block_sparse_attention(inp.q, inp.k, inp.v, tiles, segment_ids=inp.segment_ids, causal=True,
                                              block_size=DOCUMENT_TILE, impl="xla" if self.impl == "xla" else "auto",
                                              skip_threshold=self.skip_threshold, return_skipped=True)
        if hasattr(self, "__captures__"):
            self.sow(AuxMetric, "skipped", jax.lax.stop_gradient(skipped_share(skipped, tiles, DOCUMENT_TILE)))
        return out
