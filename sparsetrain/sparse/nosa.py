"""method="nosa": NOSA, native and offloadable sparse attention (arXiv 2510.13602; method notes §7).

InfLLM-V2's block selection (sparsetrain/sparse/infllm_v2.py) split in two parts:
  * query-aware: the `initial_blocks` sinks, the `local_blocks` window up to the diagonal and the
    `query_topk` best other blocks by InfLLM-V2's compressed-key scores;
  * query-agnostic: the rest of the `topk` budget, filled with the blocks of highest eviction score
    c_j = A * softplus(W_delta v_j) (per KV head, block-max-pooled; sparsetrain/sparse/key_scores.py).
The query-agnostic part changes little from one query to the next, so a decoder keeps those blocks on
the GPU (the locality NOSA exists for; `locality` below measures it). The logits get c_j as a bias
through the kernel's `key_bias`, which is how A and W_delta train (dBias); the choice of blocks
itself gets no gradient.

Granularity: per query tile only (InfLLM-V2's `granularity="tile"`: a tile is scored with the
previous tile's tokens), because the key bias is not on the token-level kernel yet; NOSA selects
per token. Defaults follow NOSA: compressed keys 32/16, blocks of 64, a 1024-token window, 64 blocks
in all, 1 sink block, no dense switch (dense_len 0). The split of the budget (`query_topk`) is ours.

Under a context split (mesh.context > 1) NOSA runs as InfLLM-V2 does, over either K/V exchange, its
key bias travelling with the keys as DMA's does (sparsetrain/sparse/dma.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sparsetrain import ops
from sparsetrain.attention.documents import document_tiles
from sparsetrain.attention.method import AttentionInputs
from sparsetrain.attention.spec import MethodExport
from sparsetrain.sparse import key_scores
from sparsetrain.sparse.dma import biased_attention
from sparsetrain.sparse.infllm_v2 import (InfllmV2Attention, InfllmV2Options, lagged_tile_scores, select_blocks,
                                          token_scores)


@dataclasses.dataclass(frozen=True)
class NosaOptions(InfllmV2Options):
    method: str = "nosa"
    topk: int = 64               # key blocks per query tile in all, both parts and the forced ones
    local_blocks: int = 16       # a 1024-token window at blocks of 64, the diagonal included
    dense_len: int = 0           # NOSA runs sparse at every length
    query_topk: int = 16         # query-aware blocks beyond the forced ones; the rest is query-agnostic
    granularity: Literal["tile"] = "tile"
    # Add the eviction score to the logits (NOSA). False: it only chooses blocks and A, W_delta get
    # no gradient (an ablation; and the suite's full-budget check against dense attention).
    logit_bias: bool = True

    # Sizes scaled to the suite's 16-token blocks and ~100-token sequences; InfLLM-V2's token
    # variants do not apply.
    conformance_base = {"kernel_size": 8, "kernel_stride": 4, "coarse_size": 16, "coarse_stride": 8, "topk": 4,
                        "local_blocks": 1, "query_topk": 1, "score_chunk": 32}
    conformance_variants = {}
    export = MethodExport(torch_impl="nosa", torch_requires=("infllm_v2",),
                          fields=(*InfllmV2Options.export.fields, "query_topk", "logit_bias"),
                          params={name: (name, "identity") for name in (key_scores.SCALE, key_scores.PROJECTION)})

    def validate(self) -> None:
        super().validate()
        self.require(self.granularity == "tile", "granularity",
                     "must be 'tile' (the key bias is not on the token-level kernel yet)")
        forced = self.initial_blocks + self.local_blocks
        self.require(0 <= self.query_topk <= self.topk - forced, "query_topk",
                     f"must be in [0, topk - initial_blocks - local_blocks = {self.topk - forced}]")

    def full_budget(self) -> "NosaOptions":
        return dataclasses.replace(self, topk=1 << 20, logit_bias=False)

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "NosaAttention":
        return NosaAttention(self, num_heads, num_kv_heads, head_dim, rngs)


class NosaAttention(InfllmV2Attention):
    """InfLLM-V2's query-aware blocks, the eviction score's blocks for the rest, the score as bias."""

    def __init__(self, options: NosaOptions, num_heads, num_kv_heads, head_dim, rngs: nnx.Rngs):
        super().__init__(options, num_heads, num_kv_heads, head_dim)
        key_scores.add_parameters(self, num_kv_heads, head_dim, rngs)

    def select(self, inp: AttentionInputs) -> ops.Selection:
        o = self.options
        seq, bs = inp.q.shape[1], o.block_size
        bias = key_scores.key_bias(self, inp.v)
        q, k = jax.lax.stop_gradient((inp.q, inp.k))
        scores = lagged_tile_scores(token_scores(q, k, o, 1.0 / math.sqrt(self.head_dim), inp.segment_ids), bs)
        query_aware = dataclasses.replace(o, topk=o.initial_blocks + o.local_blocks + o.query_topk)
        chosen = select_blocks(scores, seq, query_aware, positions=inp.positions, segment_ids=inp.segment_ids)
        chosen = jnp.broadcast_to(chosen, scores.shape)
        valid = ops.causal_block_mask(seq, seq, bs) & document_tiles(inp.segment_ids, bs)
        mask = key_scores.fill_blocks(chosen, key_scores.block_max(bias, bs), o.topk, valid)
        return ops.Selection.from_mask(mask, key_bias=bias, query_aware=chosen)

    def attend(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        return biased_attention(self, inp, sel)

    def metrics(self, inp: AttentionInputs, sel: ops.Selection, out: jax.Array) -> dict:
        """The base metrics and `locality` of the selection (and of its query-aware part alone)."""
        values = super().metrics(inp, sel, out)
        values["locality"] = locality(sel.to_mask())
        values["locality_query_aware"] = locality(sel.extras["query_aware"])
        return values


def locality(selection: jax.Array) -> jax.Array:
    """The share of each query tile's selected blocks that the previous tile selected too, over
    tiles 1.. (bool [..., nQ, nK] -> f32 scalar): how many blocks a decoder stepping from one
    tile to the next finds already loaded (NOSA's locality, at tile granularity)."""
    now, before = selection[..., 1:, :], selection[..., :-1, :]
    return (now & before).sum() / jnp.maximum(now.sum(), 1)
