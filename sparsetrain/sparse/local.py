"""method="local": block-sparse attention over a fixed pattern, with no parameters.

Query block i (tokens i*bs .. i*bs+bs-1) keeps the key blocks i-local_blocks+1 .. i (a sliding
window of whole blocks ending at the diagonal) and the first `initial_blocks` key blocks
(attention sinks); inside kept blocks attention is causal. Elementwise, query position p sees key
position j iff j <= p and (j//bs > p//bs - local_blocks or j//bs < initial_blocks). The exported
PyTorch model implements this same rule (sparsetrain/export/torch/local.py). With packed documents
the blocks count within the query's document (the window and the sinks stop at its first block).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparsetrain import ops
from sparsetrain.attention.documents import document_tiles
from sparsetrain.attention.method import AttentionInputs, BlockSparseOptions, SparseMethod
from sparsetrain.attention.spec import MethodExport


def local_block_mask(seq_q: int, seq_kv: int, *, block_size: int, local_blocks: int,
                     initial_blocks: int, documents=True) -> jax.Array:
    """bool [nQ, nK]: the key blocks each query block attends to (end-aligned causal). documents:
    `document_tiles` of packed rows ([B, 1, nQ, nK]); then the window and the sinks count the
    blocks of the query block's own document (the sinks are its document's first blocks)."""
    valid = ops.causal_block_mask(seq_q, seq_kv, block_size) & documents
    return ops.forced_block_mask(valid, force_first=initial_blocks, force_local=local_blocks)


@dataclasses.dataclass(frozen=True)
class LocalOptions(BlockSparseOptions):
    method: str = "local"

    conformance_variants = {"ssa": {"ssa": True}}
    export = MethodExport(torch_impl="local", fields=("block_size", "local_blocks", "initial_blocks"))
    context_parallel = ("all_gather", "ring")

    def full_budget(self) -> "LocalOptions":
        return dataclasses.replace(self, local_blocks=1 << 20)

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "LocalBlockAttention":
        return LocalBlockAttention(self, num_heads, num_kv_heads, head_dim)

    def density(self, seq_len: int) -> float:
        mask = local_block_mask(seq_len, seq_len, block_size=self.block_size,
                                local_blocks=self.local_blocks, initial_blocks=self.initial_blocks)
        return float(ops.selection_density(mask, seq_len, seq_len, self.block_size))


class LocalBlockAttention(SparseMethod):
    """Parameter-free: the same window for every batch row and GQA group."""

    def select(self, inp: AttentionInputs) -> ops.Selection:
        o = self.options
        mask = local_block_mask(inp.q.shape[1], inp.k.shape[1], block_size=o.block_size,
                                local_blocks=o.local_blocks, initial_blocks=o.initial_blocks,
                                documents=document_tiles(inp.segment_ids, o.block_size))
        # One selection per kv head (GQA group).
        mask = jnp.broadcast_to(mask, (inp.q.shape[0], self.num_kv_heads, *mask.shape[-2:]))  # [B, K, nQ, nK]
        return ops.Selection.from_mask(mask)
