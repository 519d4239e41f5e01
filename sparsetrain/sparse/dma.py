"""method="dma": Dynamic Mask Attention (arXiv 2508.02124; method notes §7), on key blocks.

Per KV head h and key j a learned bias b[h, j] = A[h] * softplus(W_delta v_j) (A starts at 0;
sparsetrain/sparse/key_scores.py) is added to the attention logits of the group's queries through
the kernel's `key_bias`, whose gradient (dBias) trains A and W_delta. The same bias chooses which
keys a query sees, a choice that gets no gradient.

Selection. The paper keeps, per query, the `window` keys of highest bias among its causal keys.
Here each query tile of `block_size` tokens keeps `window // block_size` key blocks: its own
(diagonal) block and `local_blocks - 1` before it, the first `initial_blocks`, and the causal
blocks of highest block-max bias (ties to the lower block). Selection per key block lets the tile
kernel skip every unselected tile and run the kept ones unmasked; what it changes against the
per-key rule (which keys of the exact top-`window` a query keeps, and its output) is measured by
tests/sparse/test_dma.py and quoted in docs/sparse_methods.md. Rows with at most `window //
block_size` causal blocks keep them all, so sequences up to `window` tokens attend densely (with
the bias).

The selection is causal per token: tile i ranks only blocks before it (the diagonal block is
forced, whatever its later keys score). With packed documents, only blocks of the query's
document are candidates.

Context parallelism (mesh.context > 1), over either K/V exchange: the bias is computed and the blocks
chosen in natural order like any selection; the bias [B, K, S] is then a per-key input of the kernel
that travels with the keys (gathered and rolled with them, or passed around the ring with each K/V
slice), and its gradient returns to the devices holding those keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparsetrain import ops
from sparsetrain.attention.documents import document_tiles
from sparsetrain.attention.method import AttentionInputs, BlockSparseOptions, SparseMethod
from sparsetrain.attention.spec import MethodExport
from sparsetrain.sparse import key_scores


@dataclasses.dataclass(frozen=True)
class DmaOptions(BlockSparseOptions):
    method: str = "dma"
    window: int = 2048           # keys per query (as whole blocks, the forced ones included)
    # Add the key bias to the logits (the paper). False: it only chooses blocks, A and W_delta get
    # no gradient (an ablation; and the suite's full-budget check against dense attention).
    logit_bias: bool = True

    # The key bias travels with K/V over either exchange (its dBias comes back with their gradients).
    context_parallel = ("all_gather", "ring")

    # The suite's ~100-token sequences at 16-token blocks: 3 blocks a query keeps it sparse.
    conformance_base = {"window": 48}
    export = MethodExport(torch_impl="dma",
                          fields=("block_size", "local_blocks", "initial_blocks", "window", "logit_bias"),
                          params={name: (name, "identity") for name in (key_scores.SCALE, key_scores.PROJECTION)})

    def validate(self) -> None:
        super().validate()
        self.require(self.window > 0 and self.window % self.block_size == 0, "window",
                     f"must be a positive multiple of block_size={self.block_size} (whole key blocks)")
        self.require(self.window // self.block_size >= self.initial_blocks + self.local_blocks, "window",
                     f"must hold the forced blocks: >= (initial_blocks + local_blocks) * block_size = "
                     f"{(self.initial_blocks + self.local_blocks) * self.block_size}")

    @property
    def topk(self) -> int:
        """Key blocks per query tile, the forced ones included."""
        return self.window // self.block_size

    def full_budget(self) -> "DmaOptions":
        return dataclasses.replace(self, window=self.block_size << 16, logit_bias=False)

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "DmaAttention":
        return DmaAttention(self, num_heads, num_kv_heads, head_dim, rngs)

    def density(self, seq_len: int) -> float:
        """The static budget: every tile keeps min(topk, its causal blocks)."""
        n = -(-seq_len // self.block_size)
        mask = select_blocks(jnp.zeros((1, 1, n)), seq_len, self)
        return float(ops.selection_density(mask, seq_len, seq_len, self.block_size))


def select_blocks(scores: jax.Array, seq_len: int, o: "DmaOptions", documents=True) -> jax.Array:
    """bool [B, K, nQ, nK]: per query tile, the forced blocks plus the causal blocks of highest
    score, `o.topk` in all. scores f32 [B, K, nK] are query-agnostic (block-max key scores);
    documents: `document_tiles` of packed rows, or True."""
    valid = ops.causal_block_mask(seq_len, seq_len, o.block_size) & documents
    forced = ops.forced_block_mask(jnp.broadcast_to(valid, (*scores.shape[:2], *valid.shape[-2:])),
                                   force_first=o.initial_blocks, force_local=o.local_blocks)
    return key_scores.fill_blocks(forced, scores, o.topk, valid)


class DmaAttention(SparseMethod):
    """Key blocks chosen by the learned key bias, which is also added to the logits."""

    def __init__(self, options: DmaOptions, num_heads, num_kv_heads, head_dim, rngs: nnx.Rngs):
        super().__init__(options, num_heads, num_kv_heads, head_dim)
        key_scores.add_parameters(self, num_kv_heads, head_dim, rngs)

    def select(self, inp: AttentionInputs) -> ops.Selection:
        bias = key_scores.key_bias(self, inp.v)
        scores = key_scores.block_max(bias, self.options.block_size)
        mask = select_blocks(scores, inp.q.shape[1], self.options,
                             documents=document_tiles(inp.segment_ids, self.options.block_size))
        return ops.Selection.from_mask(mask, key_bias=bias)

    def attend(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        return biased_attention(self, inp, sel)


def biased_attention(method: SparseMethod, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
    """The tile kernel over a selection whose extras hold the key bias [B, K, S] (DMA, NOSA), added
    to the logits when the method's options say `logit_bias`."""
    bias = sel.extras["key_bias"] if method.options.logit_bias else None
    return method.kernel_attention(inp, sel.to_mask(), key_bias=bias)
