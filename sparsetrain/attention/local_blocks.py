"""method="local": block-sparse attention over a fixed pattern, with no parameters.

Query block i (tokens i*bs .. i*bs+bs-1) keeps the key blocks i-local_blocks+1 .. i (a sliding
window of whole blocks ending at the diagonal) and the first `initial_blocks` key blocks
(attention sinks); inside kept blocks attention is causal. Elementwise, query position p sees key
position j iff j <= p and (j//bs > p//bs - local_blocks or j//bs < initial_blocks). The exported
PyTorch model implements this same rule (sparsetrain/export/torch/modeling_sparse_llama.py).

It is the simplest block-sparse layer kind: learned selection methods reuse the same block-mask and
kernel path, only choosing the blocks differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsetrain.attention.spec import AttentionSpec
from sparsetrain.attention.sharded import block_sparse_attention
from sparsetrain.ops import causal_block_mask, forced_block_mask


def local_block_mask(seq_q: int, seq_kv: int, *, block_size: int, local_blocks: int,
                     initial_blocks: int) -> jax.Array:
    """bool [nQ, nK]: the key blocks each query block attends to (end-aligned causal)."""
    valid = causal_block_mask(seq_q, seq_kv, block_size)
    return forced_block_mask(valid, force_first=initial_blocks, force_local=local_blocks)


class LocalBlockAttention(nnx.Module):
    """Parameter-free attention layer for `method="local"` (dispatcher call signature)."""

    def __init__(self, spec: AttentionSpec):
        self.block_size = spec.block_size
        self.local_blocks = spec.local_blocks
        self.initial_blocks = spec.initial_blocks
        self.impl = spec.impl

    @classmethod
    def build(cls, spec, num_heads, num_kv_heads, head_dim, rngs) -> "LocalBlockAttention":
        return cls(spec)

    @staticmethod
    def density(spec: AttentionSpec, seq_len: int) -> float:
        """Kept tiles over causal tiles, diagonal tiles counted as half (they are half visible)."""
        mask = np.asarray(local_block_mask(seq_len, seq_len, block_size=spec.block_size,
                                           local_blocks=spec.local_blocks,
                                           initial_blocks=spec.initial_blocks))
        weight = np.tril(np.ones(mask.shape)) - 0.5 * np.eye(mask.shape[0])
        return float((mask * weight).sum() / weight.sum())

    def __call__(self, q, k, v, *, q_raw=None, k_raw=None, segment_ids=None):
        """q [B, T, N, H], k/v [B, T, K, H] (after RoPE) -> [B, T, N, H]."""
        del q_raw, k_raw, segment_ids  # packed documents attend across boundaries, as in dense layers
        mask = local_block_mask(q.shape[1], k.shape[1], block_size=self.block_size,
                                local_blocks=self.local_blocks, initial_blocks=self.initial_blocks)
        # One selection per kv head (GQA group), the same for every batch row and head.
        mask = jnp.broadcast_to(mask, (q.shape[0], k.shape[2], *mask.shape))  # [B, K, nQ, nK]
        return block_sparse_attention(q, k, v, mask, causal=True, block_size=self.block_size,
                                      impl=self.impl)
