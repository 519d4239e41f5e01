"""method="seer": SeerAttention block gates, distilled from the dense attention map (arXiv 2410.13276;
microsoft/SeerAttention `AttnGate`).

The gate of a layer (§1.1 of the method notes):
  1. pool the pre-RoPE Q per block of `block_size` tokens (average) and the pre-RoPE K (max, min and
     average, concatenated on the feature axis), over the real tokens of each block (ceil mode);
  2. per query head linear maps to `d_gate` channels (K repeated over its GQA group first):
     q̂ = pool(Q)_h W^q_h, k̂ = pool(K)_h W^k_h, with W^q [N, H, d_gate] and W^k [N, 3H, d_gate];
  3. RoPE with head dim d_gate at each block's first position;
  4. logits s[h, i, j] = q̂_i · k̂_j / sqrt(d_gate) over the candidate key blocks j of query block i.

The target (§1.2) is `block_attention_scores`: the 2-D max-pool of the dense softmax map, row-
normalised. The loss (§1.3) is KL(target ‖ softmax(logits)) per query-block row, rows of the first
quarter of the query blocks left out, averaged over rows, heads, batch and Seer layers, times
`kl_weight`.

Modes: "distill" computes dense attention (cuDNN on GPU), trains only the gates (the base model is
frozen by the trainer) and reports what sparse mode would select; on the Triton kernel, when the
target is needed and `fused_scores` is set, the dense output and the block scores come from one
fused forward instead (`ops.attention_with_block_scores`, computed in `select` and carried to
`attend` in the extras).
"sparse" attends to the selected blocks through the block-sparse kernel, optionally keeping the KL
loss (`sparse_kl`) while the whole model fine-tunes. Selection: `topk` blocks per row, a
`target_density` share of each row's causal blocks, gate probabilities above `threshold`, or the
most probable blocks up to mass `topp`; the diagonal, `local_blocks` and `initial_blocks` are always
kept and count inside top-k budgets.

Deviations from the reference, each a choice made for training and export, not for prefill only:
  * `query_pool="lagged"` (default): the gate for query block i reads the average Q of block i-1
    and scores only the strictly earlier key blocks j < i (the diagonal is always kept, as in
    SeerAttention-R). The paper's gate (`query_pool="block"`) averages Q over block i itself, so a
    token's selection depends on later tokens of its block: harmless for prefill, but a leak when
    training with the LM loss, and impossible to reproduce while decoding with a KV cache. With
    "lagged" the method is causal per token and the exported model decodes exactly. The target is
    then restricted to j < i and renormalised. tests/sparse/test_seer.py measures the recall each
    pooling reaches after the same distillation.
  * Both Q and K always get a linear map (the reference drops the Q map when d_gate == head_dim).
  * The KL is averaged per row (nats per query block); PyTorch's KLDivLoss "mean" in the reference
    also divides by the number of key blocks, which only rescales the weight.
  * `share_kv_heads=True` (one selection per KV head, SeerAttention-R style) averages the logits of
    a group's query heads and max-pools the target over them, instead of R's concatenated-heads map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sparsetrain import ops
from sparsetrain.attention.dense import dense_causal_attention
from sparsetrain.attention.documents import block_document_tokens, document_tiles, last_document_starts
from sparsetrain.attention.method import AttentionInputs, BlockSparseOptions, SparseMethod
from sparsetrain.attention.sharded import attention_with_block_scores
from sparsetrain.attention.spec import MethodExport
from sparsetrain.ops.platform import kernel_backend
from sparsetrain.sparse.pooling import lag_blocks, pool_blocks


@dataclasses.dataclass(frozen=True)
class SeerOptions(BlockSparseOptions):
    method: str = "seer"
    mode: Literal["distill", "sparse"] = "distill"
    d_gate: int = 128                 # gate channels; head_dim if that is smaller
    query_pool: Literal["lagged", "block"] = "lagged"
    share_kv_heads: bool = False      # one selection per KV head instead of per query head
    select: Literal["topk", "density", "threshold", "topp"] = "topk"
    topk: int = 8                     # select="topk": blocks per query-block row, forced ones included
    target_density: float = 0.1       # select="density": share of each row's causal blocks
    threshold: float = 5e-3           # select="threshold": keep blocks whose gate probability exceeds it
    topp: float = 0.9                 # select="topp": smallest set of blocks with this gate mass
    kl_weight: float = 10.0           # weight of the KL loss in the objective
    kl_skip_fraction: float = 0.25    # leading share of query-block rows left out of the KL
    sparse_kl: bool = False           # mode="sparse": keep the KL loss (gates train with the model)
    # mode="distill" on the Triton kernel: dense output and block scores from one fused forward.
    # Off by default until it has been timed and run compiled on a GPU (docs/kernels.md); it also
    # holds 4*B*N*T*nK bytes of row maxima during the call (4.3 GB per layer at 64k, N=16).
    fused_scores: bool = False

    conformance_variants = {"sparse": {"mode": "sparse"},
                            "sparse_shared_density": {"mode": "sparse", "share_kv_heads": True,
                                                      "select": "density", "target_density": 0.5}}
    export = MethodExport(
        torch_impl="seer",
        fields=("mode", "block_size", "local_blocks", "initial_blocks", "d_gate", "query_pool",
                "share_kv_heads", "select", "topk", "target_density", "threshold", "topp"),
        params={"q_gate": ("q_gate", "identity"), "k_gate": ("k_gate", "identity")})
    context_parallel = ("all_gather", "ring")

    def validate(self) -> None:
        super().validate()
        self.require(self.d_gate > 0 and self.d_gate % 2 == 0, "d_gate", "must be even and > 0 (RoPE pairs)")
        self.require(self.topk >= 1, "topk", "must be >= 1")
        self.require(0.0 < self.target_density <= 1.0, "target_density", "must be in (0, 1]")
        self.require(0.0 <= self.threshold < 1.0, "threshold", "must be in [0, 1)")
        self.require(0.0 < self.topp <= 1.0, "topp", "must be in (0, 1]")
        self.require(self.kl_weight > 0, "kl_weight", "must be > 0 (the gates learn only from it)")
        self.require(0.0 <= self.kl_skip_fraction < 1.0, "kl_skip_fraction", "must be in [0, 1)")
        self.require(not self.sparse_kl or self.mode == "sparse", "sparse_kl", "applies to mode='sparse'")

    @property
    def param_policy(self):
        if self.mode == "distill":
            return "own_only"
        return "all" if self.sparse_kl else "base_only"

    @property
    def causal_granularity(self):
        return "block" if self.query_pool == "block" and self.mode == "sparse" else "token"

    def full_budget(self) -> "SeerOptions":
        return dataclasses.replace(self, mode="sparse", select="topk", topk=1 << 20)

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "SeerAttention":
        return SeerAttention(self, num_heads, num_kv_heads, head_dim, rngs)

    def density(self, seq_len: int) -> float:
        """The configured budget (the measured density is reported while training)."""
        if self.mode == "distill":
            return 1.0
        n_blocks = -(-seq_len // self.block_size)
        if self.select == "topk":
            # A row i has i + 1 causal blocks: min(topk, i + 1) kept, the diagonal counting half.
            kept = sum(min(self.topk, i + 1) - 0.5 for i in range(n_blocks))
            return min(1.0, kept / (n_blocks * n_blocks / 2))
        if self.select == "density":
            return self.target_density
        return 1.0   # threshold / top-p: no static budget; FLOP counts assume dense


# ------------------------------------------------------------------------------------------------
# The gate's math, as plain functions (tests/sparse/test_seer.py checks each against a reference).

def candidate_blocks(n_q: int, n_k: int, query_pool: str) -> jax.Array:
    """bool [nQ, nK]: the key blocks the gate scores for each query block (T == S): j <= i for the
    paper's block pooling, j < i for lagged pooling (the diagonal is always kept, never scored)."""
    i, j = jnp.arange(n_q)[:, None], jnp.arange(n_k)[None, :]
    return j < i if query_pool == "lagged" else j <= i


def gate_logits(q_nope, k_nope, positions, w_q, w_k, *, block_size: int, query_pool: str, rope,
                segment_ids=None):
    """Gate logits f32 [B, N, nQ, nK], -inf outside the candidate blocks.

    q_nope [B, T, N, H], k_nope [B, T, K, H] (before RoPE); positions [B, T]; w_q [N, H, E],
    w_k [N, 3H, E]; rope(x [B, n, N, E], positions [B, n]) the model's rotary embedding.
    segment_ids [B, T] of packed documents: key blocks holding none of the query block's documents
    are no candidates, and a block straddling documents is summarised over the one document it can
    share with the other side (keys: its last document, placed where that document's positions put
    the block; queries: its first, or for lagged pooling the previous block's last).
    """
    n, k = q_nope.shape[2], k_nope.shape[2]
    if query_pool == "lagged":
        # Block i reads block i-1's queries; block 0 has no candidates, so its zeros are unused.
        q_pool = lag_blocks(pool_blocks(q_nope, block_size, ("avg",),
                                        block_document_tokens(segment_ids, block_size, "last")))
    else:
        q_pool = pool_blocks(q_nope, block_size, ("avg",),
                             block_document_tokens(segment_ids, block_size, "first"))
    k_pool = pool_blocks(k_nope, block_size, ("max", "min", "avg"),
                         block_document_tokens(segment_ids, block_size, "last"))  # [B, nK, K, 3H]
    k_pool = jnp.repeat(k_pool, n // k, axis=2)                            # [B, nK, N, 3H]
    q_hat = rope(jnp.einsum("BQNH,NHE->BQNE", q_pool, w_q), positions[:, ::block_size])
    k_hat = rope(jnp.einsum("BKNF,NFE->BKNE", k_pool, w_k), last_document_starts(positions, block_size))
    logits = jnp.einsum("BQNE,BKNE->BNQK", q_hat, k_hat) / math.sqrt(w_q.shape[-1])
    valid = candidate_blocks(logits.shape[2], logits.shape[3], query_pool)
    return jnp.where(valid & document_tiles(segment_ids, block_size), logits, -jnp.inf)


def kl_target(scores: jax.Array, query_pool: str) -> jax.Array:
    """The distillation target from `block_attention_scores` [B, N, nQ, nK]: restricted to the
    candidate blocks and renormalised per row (rows with no mass stay 0)."""
    valid = candidate_blocks(scores.shape[2], scores.shape[3], query_pool)
    target = jnp.where(valid, scores, 0.0)
    total = target.sum(-1, keepdims=True)
    return jnp.where(total > 0, target / jnp.where(total > 0, total, 1.0), 0.0)


def share_over_groups(logits, target, group: int):
    """GQA-shared selection: logits averaged over each group's query heads (-inf stays -inf) and
    the target max-pooled over them and renormalised: [B, N, ...] -> [B, N // group, ...]."""
    b, n = logits.shape[:2]
    logits = logits.reshape(b, n // group, group, *logits.shape[2:]).mean(2)
    target = target.reshape(b, n // group, group, *target.shape[2:]).max(2)
    total = target.sum(-1, keepdims=True)
    return logits, jnp.where(total > 0, target / jnp.where(total > 0, total, 1.0), 0.0)


def kl_loss(logits: jax.Array, target: jax.Array, skip_fraction: float) -> jax.Array:
    """Mean over rows of KL(target ‖ softmax(logits)) in nats; rows with no target mass and the
    first `skip_fraction` of query-block rows are left out. logits/target [..., nQ, nK]."""
    n_q = logits.shape[-2]
    log_p = jax.nn.log_softmax(jnp.where(jnp.isfinite(logits), logits, -1e30), axis=-1)
    row_kl = jnp.sum(jax.scipy.special.xlogy(target, target) - jnp.where(target > 0, target * log_p, 0.0), -1)
    rows = (target.sum(-1) > 0) & (jnp.arange(n_q) >= int(n_q * skip_fraction))
    return jnp.sum(jnp.where(rows, row_kl, 0.0)) / jnp.maximum(rows.sum(), 1)


def select_blocks(logits: jax.Array, options: SeerOptions, seq_len: int, documents=True) -> jax.Array:
    """bool [..., nQ, nK]: the kept key blocks of each query-block row (causal self-attention).
    documents: `document_tiles` [B, 1, nQ, nK] of packed rows; forced blocks and density budgets
    then count within the query block's document."""
    o = options
    valid = ops.causal_block_mask(seq_len, seq_len, o.block_size) & documents
    forced = dict(force_first=o.initial_blocks, force_local=o.local_blocks, valid=valid)
    probs = jax.nn.softmax(jnp.where(jnp.isfinite(logits), logits, -1e30), axis=-1)
    probs = jnp.where(jnp.isfinite(logits), probs, 0.0)
    if o.select == "topk":
        return ops.topk_block_mask(logits, o.topk, **forced)
    if o.select == "density":
        budget = jnp.maximum(1, jnp.ceil(o.target_density * valid.sum(-1))).astype(jnp.int32)
        return ops.budget_block_mask(logits, budget, **forced)
    if o.select == "threshold":
        return ops.threshold_block_mask(probs, o.threshold, **forced)
    return ops.topp_block_mask(probs, o.topp, **forced)


class SeerAttention(SparseMethod):
    def __init__(self, options: SeerOptions, num_heads, num_kv_heads, head_dim, rngs: nnx.Rngs):
        super().__init__(options, num_heads, num_kv_heads, head_dim)
        d_gate = min(options.d_gate, head_dim)
        init = nnx.initializers.normal(0.02)   # the reference's initializer_range
        # Logical axes: heads shard like the attention heads they gate; the rest stays whole.
        self.q_gate = nnx.Param(init(rngs.params(), (num_heads, head_dim, d_gate), jnp.float32),
                                out_sharding=("heads", None, None), eager_sharding=False)
        self.k_gate = nnx.Param(init(rngs.params(), (num_heads, 3 * head_dim, d_gate), jnp.float32),
                                out_sharding=("heads", None, None), eager_sharding=False)

    def select(self, inp: AttentionInputs) -> ops.Selection:
        """Gate logits -> kept blocks, per query head (or per KV head when shared). The block
        scores (the dense map's target) are computed when a loss or recall needs them."""
        o = self.options
        # The gate learns to predict the frozen layer: no gradient into q/k from the KL.
        q_nope, k_nope = jax.lax.stop_gradient((inp.q_nope, inp.k_nope))
        logits = gate_logits(q_nope, k_nope, inp.positions, self.q_gate[...], self.k_gate[...],
                             block_size=o.block_size, query_pool=o.query_pool, rope=inp.rope,
                             segment_ids=inp.segment_ids)
        extras = {}
        if (self.reporting and (o.mode == "distill" or o.sparse_kl)) or self.wants_scores(inp):
            if self.fuses_scores():
                extras["output"], extras["scores"] = attention_with_block_scores(
                    inp.q, inp.k, inp.v, segment_ids=inp.segment_ids, block_size=o.block_size, causal=True,
                    impl=o.impl)
            else:
                extras["scores"] = self.block_scores(inp)
            extras["target"] = kl_target(extras["scores"], o.query_pool)
        if o.share_kv_heads:
            group = self.num_heads // self.num_kv_heads
            logits, shared = share_over_groups(logits, extras.get("target", logits), group)
            if "target" in extras:
                extras["target"] = shared
        mask = select_blocks(logits, o, inp.q.shape[1], document_tiles(inp.segment_ids, o.block_size))
        return ops.Selection.from_mask(mask, logits=logits, **extras)

    def fuses_scores(self) -> bool:
        """`fused_scores` in distill mode on the Triton kernel: the dense output and the block
        scores come from one forward pass (`ops.attention_with_block_scores`) instead of cuDNN plus
        the two scores passes. Other backends keep dense attention + `block_attention_scores`."""
        o = self.options
        return o.fused_scores and o.mode == "distill" and kernel_backend(o.impl, None)[0] in ("triton", "mosaic_gpu")

    def attend(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        if self.options.mode == "distill":
            if "output" in sel.extras:   # computed in `select` together with the scores
                return sel.extras["output"]
            return dense_causal_attention(inp.q, inp.k, inp.v, segment_ids=inp.segment_ids)
        return super().attend(inp, sel)

    def losses(self, inp, sel, out) -> dict:
        o = self.options
        if "target" not in sel.extras or not (o.mode == "distill" or o.sparse_kl):
            return {}
        return {"seer_kl": o.kl_weight * kl_loss(sel.extras["logits"], sel.extras["target"],
                                                 o.kl_skip_fraction)}

    def metrics(self, inp, sel, out) -> dict:
        """Measured density; with the block scores at hand, recall (share of the dense map inside
        the selection) and the unweighted KL in nats."""
        mask = sel.to_mask()
        values = {"density": ops.selection_density(mask, inp.q.shape[1], inp.k.shape[1],
                                                   self.options.block_size)}
        if "scores" in sel.extras:
            values["recall"] = ops.selection_recall(mask, sel.extras["scores"])
            values["kl"] = kl_loss(sel.extras["logits"], sel.extras["target"],
                                   self.options.kl_skip_fraction)
        return values
