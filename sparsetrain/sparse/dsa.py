"""method="dsa": DeepSeek Sparse Attention (DeepSeek-V3.2-Exp), the lightning indexer choosing
`topk` keys per query token, shared by all heads of the layer (method notes §6).

The indexer (sparsetrain/sparse/dsa_indexer.py) reads the layer's normalised input x: J small heads
of queries, one LayerNorm-ed key per token, per-token head weights, partial RoPE, and scores
I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) over the keys s <= t of t's document. Each query token
keeps its `topk` best keys (all of them while it has at most `topk`), and the layer attends to
exactly those (`ops.selected_key_attention`, one list per token for all heads: XLA gathers, or the
Triton kernel with impl="pallas").

Training, in two modes that `trainer.phases` switches (configs/dsa_tiny.py):
  * "warmup": dense attention, only the indexer trains (the trainer freezes the rest). Its loss is
    KL(p || softmax(I)) per token, p the layer's attention probabilities summed over heads and
    L1-normalised, averaged over tokens, times `kl_weight`.
  * "sparse": top-k attention; the KL runs over each token's selected keys only. The indexer's
    input is detached, so the indexer learns only from the KL and the model only from the LM loss
    (top-k passes no gradient, and the KL's target is the layer's detached attention).
Sequences of at most `dense_len` tokens run the dense layer itself (cuDNN/XLA), as DeepSeek serves
short prefills; `dense_len <= topk`, so those rows would have kept every key anyway and a position's
output never depends on the sequence's length (the exported model decodes exactly with a KV cache).

`candidates="blocks"` is HISA's two-level search: keep the `candidate_blocks` best key blocks by
their mean indexer key, then score tokens only inside them.

Context parallelism (mesh.context > 1) runs over the all-gather K/V exchange only. The indexer and
the top-k run as the one-device code in natural order (GSPMD partitions them along T, gathering the
indexer's keys, one E-wide vector per token), and the attention runs each device's query rows over the
gathered K/V (`sparsetrain.attention.sharded.selected_key_attention`). The ring does not pay here: a
token's list mixes keys of every chunk, and the selected-key kernel walks the whole padded list
whatever it holds, so each of the 2n (query chunk, key chunk) pairs of the ring would walk every list
again (2n times the attention work) to save the K/V that the all-gather holds.

Deviations from the paper (docs/sparse_methods.md): the indexer reads x, not MLA's query latent;
no Hadamard rotation or FP8 (both for inference speed); the KL is averaged over tokens, not summed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsetrain import ops
from sparsetrain.attention.dense import dense_causal_attention
from sparsetrain.attention.documents import document_starts
from sparsetrain.attention.method import AttentionInputs, BlockSparseOptions, SparseMethod
from sparsetrain.attention.sharded import selected_key_attention
from sparsetrain.attention.spec import MethodExport
from sparsetrain.sparse import dsa_indexer


@dataclasses.dataclass(frozen=True)
class DsaOptions(BlockSparseOptions):
    method: str = "dsa"
    mode: Literal["warmup", "sparse"] = "warmup"
    index_heads: int = 4           # J (DeepSeek-V3.2: 64)
    index_dim: int = 64            # E (DeepSeek-V3.2: 128)
    index_rope_dim: int = 32       # leading channels of the indexer's q and k that get RoPE (V3.2: 64)
    topk: int = 2048               # keys per query token, shared by every head of the layer
    dense_len: int = 2048          # sequences of at most this many tokens run dense; <= topk
    kl_weight: float = 0.01        # weight of the indexer's KL loss (MaxText's default)
    # "tokens": the indexer scores every earlier key (DSA); "blocks": HISA, only the keys of the
    # `candidate_blocks` best blocks of `block_size` tokens by their mean indexer key.
    candidates: Literal["tokens", "blocks"] = "tokens"
    candidate_blocks: int = 64
    query_chunk: int = 256         # query rows per step of the indexer and the attention (memory)

    conformance_base = {"index_heads": 2, "index_dim": 16, "index_rope_dim": 8, "query_chunk": 128}
    # HISA (candidates="blocks") shares the sparse path but its block scoring; tests/sparse/test_dsa.py
    # checks its selection, causality and torch export without the whole suite.
    conformance_variants = {"sparse": {"mode": "sparse", "topk": 24, "dense_len": 16}}
    context_parallel = ("all_gather",)   # not the ring: see the module docstring
    export = MethodExport(
        torch_impl="dsa",
        fields=("mode", "topk", "dense_len", "index_heads", "index_dim", "index_rope_dim", "candidates",
                "candidate_blocks", "block_size", "initial_blocks", "local_blocks"),
        params={name: (name, "identity") for name in
                ("index_q", "index_k", "index_k_scale", "index_k_bias", "index_weights")})

    def validate(self) -> None:
        super().validate()
        # The attention over selected keys: "auto"/"xla" its jnp reference, "pallas" the Triton kernel
        # (opt-in until timed on a GPU, docs/kernels.md).
        self.require(self.impl in ("auto", "xla", "pallas"), "impl",
                     "choose 'auto', 'xla' or 'pallas' (the selected-key kernels)")
        for name in ("index_heads", "index_dim", "topk", "query_chunk"):
            self.require(getattr(self, name) > 0, name, "must be > 0")
        self.require(0 <= self.index_rope_dim <= self.index_dim and self.index_rope_dim % 2 == 0,
                     "index_rope_dim", f"must be even and in [0, index_dim={self.index_dim}]")
        self.require(0 <= self.dense_len <= self.topk, "dense_len",
                     f"must be in [0, topk={self.topk}] (rows below it keep every key either way)")
        self.require(self.kl_weight > 0, "kl_weight", "must be > 0 (the indexer learns only from it)")
        self.require(self.candidate_blocks >= self.initial_blocks + self.local_blocks, "candidate_blocks",
                     f"must be >= initial_blocks + local_blocks = {self.initial_blocks + self.local_blocks}")

    @property
    def param_policy(self):
        return "own_only" if self.mode == "warmup" else "all"

    def full_budget(self) -> "DsaOptions":
        return dataclasses.replace(self, mode="sparse", topk=1 << 20, dense_len=0, candidate_blocks=1 << 20)

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "DsaAttention":
        return DsaAttention(self, num_heads, num_kv_heads, head_dim, model_dim, rngs)

    def density(self, seq_len: int) -> float:
        """The static budget: each token keeps min(topk, its causal keys)."""
        if self.mode == "warmup" or seq_len <= self.dense_len:
            return 1.0
        t = np.arange(1, seq_len + 1)
        return float(np.minimum(t, self.topk).sum() / t.sum())


class DsaAttention(SparseMethod):
    def __init__(self, options: DsaOptions, num_heads, num_kv_heads, head_dim, model_dim, rngs: nnx.Rngs):
        super().__init__(options, num_heads, num_kv_heads, head_dim)
        j, e = options.index_heads, options.index_dim
        init = nnx.initializers.normal(0.02)

        def param(value, axes):
            return nnx.Param(value, out_sharding=axes, eager_sharding=False)

        self.index_q = param(init(rngs.params(), (model_dim, j, e), jnp.float32), ("embed", None, None))
        self.index_k = param(init(rngs.params(), (model_dim, e), jnp.float32), ("embed", None))
        self.index_k_scale = param(jnp.ones((e,), jnp.float32), (None,))
        self.index_k_bias = param(jnp.zeros((e,), jnp.float32), (None,))
        self.index_weights = param(init(rngs.params(), (model_dim, j), jnp.float32), ("embed", None))

    def dense_regime(self, inp: AttentionInputs) -> bool:
        return self.options.mode == "warmup" or inp.k.shape[1] <= self.options.dense_len

    def indexer(self, inp: AttentionInputs) -> dsa_indexer.Indexer:
        # Detached input: the indexer learns only from its KL, never reshaping the model's x.
        return dsa_indexer.project(jax.lax.stop_gradient(inp.x), inp.positions, inp.rope, self.index_q[...],
                                   self.index_k[...], self.index_k_scale[...], self.index_k_bias[...],
                                   self.index_weights[...], self.options.index_rope_dim)

    def select(self, inp: AttentionInputs) -> ops.Selection:
        """Key lists as a token `Selection` of one-key blocks (num_blocks = S), one head for all.
        The dense regime keeps every causal key and holds no lists (indices [B, 1, T, 0]); in
        "warmup" on a long sequence, when recall is measured, the lists are what sparse mode would
        select (so the recall says when to switch).
        When losses are collected, the extras also hold the indexer's KL (`kl`)."""
        o = self.options
        b, seq = inp.q.shape[:2]
        doc_start = self.doc_start(inp)
        keys, extras = jnp.zeros((b, seq, 0), jnp.int32), {}
        lists = not (inp.k.shape[1] <= o.dense_len or (o.mode == "warmup" and not self.wants_scores(inp)))
        if not (lists or self.reporting):   # dense inference: no indexer at all
            return ops.Selection(keys[:, None], jnp.zeros((b, 1, seq), jnp.int32), inp.k.shape[1], extras, "token")
        index = self.indexer(inp)
        if lists:
            keys = dsa_indexer.select(index, doc_start, topk=o.topk, query_chunk=o.query_chunk,
                                      candidates=o.candidates, block_size=o.block_size,
                                      candidate_blocks=o.candidate_blocks, initial_blocks=o.initial_blocks,
                                      local_blocks=o.local_blocks)
        if self.reporting:
            # The KL over every causal key in the dense regime, over each token's keys in sparse mode.
            rows = dsa_indexer.kl_rows(index, inp.q, inp.k, doc_start, query_chunk=o.query_chunk,
                                       selected=None if self.dense_regime(inp) else keys)
            extras["kl"] = rows.mean()
        return ops.Selection(keys[:, None], (keys >= 0).sum(-1, dtype=jnp.int32)[:, None], inp.k.shape[1],
                             extras, "token")

    @staticmethod
    def doc_start(inp: AttentionInputs) -> jax.Array:
        b, seq = inp.q.shape[:2]
        if inp.segment_ids is None:
            return jnp.zeros((b, seq), jnp.int32)
        return document_starts(inp.segment_ids)

    def attend(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        if self.dense_regime(inp):
            return dense_causal_attention(inp.q, inp.k, inp.v, segment_ids=inp.segment_ids)
        return selected_key_attention(inp.q, inp.k, inp.v, sel.indices[:, 0], query_chunk=self.options.query_chunk,
                                      impl=self.options.impl)

    def losses(self, inp, sel, out) -> dict:
        return {"dsa_kl": self.options.kl_weight * sel.extras["kl"]}

    def metrics(self, inp, sel, out) -> dict:
        """Density (selected keys over causal keys; 1 where attention runs dense), the unweighted KL,
        and recall (the dense head-mean probability inside the selection) at evaluation or when asked."""
        values = {"kl": sel.extras["kl"], "density": jnp.float32(1.0)}
        doc_start = self.doc_start(inp)
        if not self.dense_regime(inp):
            values["density"] = sel.counts[:, 0].sum() / (jnp.arange(inp.q.shape[1]) - doc_start + 1).sum()
        if self.wants_scores(inp):
            values["recall"] = jnp.float32(1.0)
            if sel.indices.shape[-1]:
                values["recall"] = dsa_indexer.recall_rows(inp.q, inp.k, doc_start, sel.indices[:, 0],
                                                           query_chunk=self.options.query_chunk).mean()
        return values
