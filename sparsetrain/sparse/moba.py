"""method="moba": Mixture of Block Attention (Moonshot AI, MoBA tech report; MoonshotAI/MoBA), method
notes §4.

Keys are split into routing blocks of `moba_block` tokens. The gate of a query q and routing block j
is s_j(q) = <q, mean(K_j)>: the raw dot product with the block's mean key (no scale, no softmax, no
parameters), in float32, on the post-RoPE q and k, per query head (K repeated over its GQA group),
the mean over the block's real tokens. Routing blocks that start after the query are excluded; the
query's current routing block is always selected (and attended causally) and counts inside `topk`,
so `topk - 1` blocks are chosen among the strictly earlier (complete) ones, ties to the lower index.
The gate gets no gradient (top-k is not differentiable), as in the paper. `dense_last_fraction` is
the paper's hybrid recipe: the last fraction of query positions attends densely; the layer-wise
hybrid (the last layers dense) is a second rule with `method="dense"` (configs/moba_*.py).

Granularity (a deviation from the paper by default): `granularity="tile"` (default) routes per query
tile of `block_size` tokens for the tile kernel, with the mean query of a group of tokens (the gate
is linear in q: that is the mean of the tokens' scores). `granularity="token"` routes every query
token with its own query, as the paper, and hands the token-level kernel one list of key tiles per
token and query head. Per-token routing was the default until a GPU measurement (H200, 125M model
at 32k, docs/benchmarks.md) put its training step 1.29x slower than dense attention and the tile
form's 2.03x faster. What the tile form costs in routing quality is measured by
tests/sparse/test_moba.py and reported in docs/sparse_methods.md:
  * `query_pool="lagged"` (default): tile i uses the mean query of tile i-1 (the tokens strictly
    before the tile), so a token's selection never depends on later tokens: causal per token, and
    the exported model decodes exactly with a KV cache;
  * `query_pool="tile"`: tile i uses its own mean query, closer to per-token routing, but a token's
    selection depends on the later tokens of its tile (`causal_granularity` "block").
The selected routing blocks become key tiles: a row (token or tile) keeps every key tile of its
selected past routing blocks plus those of its current routing block up to its own, per query head.
`dense_last_fraction` f: rows in query tiles from floor((1 - f) * nQ) on keep every causal tile (f
is relative to the length of the forward pass; while decoding with a KV cache each new token is the
last of its sequence, so it attends densely, as MoBA's own decoding does). The base options' forced
tiles (`local_blocks` ending at the row's own tile, `initial_blocks` sinks) are kept too.

Packed documents (segment ids): every rule above applies per document, as if each were alone
(routing blocks outside the tile's document are never chosen, `dense_last_fraction` counts the
document's tiles, forced tiles stop at its first tile); `gate_scores` says how a block straddling
two documents is pooled. Exact per document when documents start on routing-block boundaries.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from sparsetrain import ops
from sparsetrain.attention.documents import (block_document_tokens, document_spans, document_starts,
                                             document_tiles)
from sparsetrain.attention.method import AttentionInputs, BlockSparseOptions, SparseMethod
from sparsetrain.attention.spec import MethodExport
from sparsetrain.sparse.pooling import lag_blocks, pool_blocks


@dataclasses.dataclass(frozen=True)
class MobaOptions(BlockSparseOptions):
    method: str = "moba"
    moba_block: int = 512               # routing block in tokens; a multiple of block_size (the tile)
    topk: int = 3                       # routing blocks per query, the current one included
    dense_last_fraction: float = 0.0    # the last fraction of query positions attends densely
    # Route each query tile (measured 2.6x faster than per token at 32k, docs/benchmarks.md) or each
    # query token with its own query (the paper; slower than dense attention on the GPU so far).
    granularity: Literal["token", "tile"] = "tile"
    query_pool: Literal["lagged", "tile"] = "lagged"   # with granularity="tile": the query a tile is routed with

    conformance_variants = {
        # Several routing blocks at the suite's lengths; lagged pooling decodes exactly.
        "blocks32": {"moba_block": 32, "topk": 2, "granularity": "token"},
        "hybrid": {"moba_block": 32, "topk": 3, "dense_last_fraction": 0.25, "granularity": "token"},
        "lagged_tiles": {"moba_block": 32, "topk": 2, "granularity": "tile"},
        # A tile's own queries cannot be known while decoding it; with the hybrid recipe the last
        # tiles (where the suite decodes) are dense, so cached decoding still matches.
        "tile": {"moba_block": 32, "topk": 2, "granularity": "tile", "query_pool": "tile",
                 "dense_last_fraction": 0.1},
    }
    export = MethodExport(torch_impl="moba",
                          fields=("block_size", "local_blocks", "initial_blocks", "moba_block", "topk",
                                  "dense_last_fraction", "granularity", "query_pool"))
    context_parallel = ("all_gather", "ring")

    def validate(self) -> None:
        super().validate()
        self.require(self.moba_block > 0 and self.moba_block % self.block_size == 0, "moba_block",
                     f"must be a positive multiple of block_size={self.block_size} (the kernel tile)")
        self.require(self.topk >= 1, "topk", "must be >= 1 (the current routing block counts)")
        self.require(0.0 <= self.dense_last_fraction < 1.0, "dense_last_fraction", "must be in [0, 1)")
        self.require(self.granularity == "tile" or self.query_pool == "lagged", "query_pool",
                     "is the query a tile is routed with: set it only with granularity='tile'")

    @property
    def causal_granularity(self):
        return "block" if self.granularity == "tile" and self.query_pool == "tile" else "token"

    def full_budget(self) -> "MobaOptions":
        return dataclasses.replace(self, topk=1 << 20)

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "MobaAttention":
        return MobaAttention(self, num_heads, num_kv_heads, head_dim)

    def density(self, seq_len: int) -> float:
        """The static budget: every query keeps min(topk - 1, earlier blocks) whole routing blocks
        and its current one causally (which past blocks does not change the count)."""
        current = current_blocks(seq_len, self.block_size, self.moba_block)    # [nQ, nR]
        earlier = jnp.cumsum(current, axis=1) == 0                            # j < current block
        routing = current | (earlier & (jnp.cumsum(earlier, axis=1) < self.topk))
        mask = tile_mask(routing, seq_len, self)
        return float(ops.selection_density(mask, seq_len, seq_len, self.block_size))


# ------------------------------------------------------------------------------------------------
# The gate and the selection, as plain functions (tests/sparse/test_moba.py checks them against
# per-token references of the paper's math).

def gate_scores(q: jax.Array, k: jax.Array, *, block_size: int, moba_block: int, query_pool: str,
                segment_ids: jax.Array | None = None) -> jax.Array:
    """float32 [B, N, nQ, nR]: the gate of each query tile (of `block_size` tokens) and routing block
    (of `moba_block`), <pooled q, mean K of the block>. q [B, T, N, H], k [B, T, K, H] post-RoPE.

    With segment ids, a block straddling documents is pooled over the one document it can share
    with the other side: the mean key over its last document (the one later tiles may share), a
    tile's query over its first (the one that reads earlier blocks; lagged: the previous tile's
    last, which continues into the tile or is never scored against)."""
    if query_pool == "lagged":                                             # tile i reads tile i-1
        q_pool = lag_blocks(pool_blocks(q, block_size, tokens=block_document_tokens(segment_ids, block_size,
                                                                                    "last")))
    else:
        q_pool = pool_blocks(q, block_size, tokens=block_document_tokens(segment_ids, block_size, "first"))
    k_last = block_document_tokens(segment_ids, moba_block, "last")
    k_mean = pool_blocks(k, moba_block, tokens=k_last)                     # [B, nR, K, H]
    k_mean = jnp.repeat(k_mean, q.shape[2] // k.shape[2], axis=2)          # [B, nR, N, H]
    return jnp.einsum("BQNH,BRNH->BNQR", q_pool, k_mean, precision=jax.lax.Precision.HIGHEST)


def current_blocks(seq_len: int, block_size: int, moba_block: int) -> jax.Array:
    """bool [nQ, nR]: the routing block each query tile lies in."""
    n_q, n_r = -(-seq_len // block_size), -(-seq_len // moba_block)
    return (jnp.arange(n_q) * block_size // moba_block)[:, None] == jnp.arange(n_r)[None, :]


def select_routing(scores: jax.Array, topk: int, seq_len: int, block_size: int, moba_block: int,
                   segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [..., nQ, nR]: per query tile, its current routing block and the `topk - 1` best strictly
    earlier ones (ties to the lower index; blocks after the current one are never chosen). With
    segment ids [B, T], routing blocks holding none of the tile's documents are never chosen."""
    current = current_blocks(seq_len, block_size, moba_block)
    valid = jnp.cumsum(current[:, ::-1], axis=1)[:, ::-1] > 0             # j <= current block
    valid = valid & document_tiles(segment_ids, block_size, moba_block)
    return ops.topk_block_mask(scores, topk, force_first=0, force_local=1, valid=valid)


def tile_mask(routing: jax.Array, seq_len: int, options: MobaOptions,
              segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [..., nQ, nK]: routing blocks [..., nQ, nR] as key tiles, causal, plus the dense last
    query tiles and the forced ones (`local_blocks`, `initial_blocks`). With segment ids [B, T],
    every kept tile holds a pair of one document, and the forced and dense tiles count within the
    query tile's document, as they would for the document alone."""
    o = options
    causal = ops.causal_block_mask(seq_len, seq_len, o.block_size) & document_tiles(segment_ids, o.block_size)
    block_of_tile = jnp.arange(causal.shape[-1]) * o.block_size // o.moba_block
    mask = jnp.take(routing, block_of_tile, axis=-1) & causal
    forced = ops.forced_block_mask(causal, force_first=o.initial_blocks, force_local=o.local_blocks)
    return mask | (dense_rows(seq_len, o, segment_ids) & causal) | forced


def dense_rows(seq_len: int, options: MobaOptions, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [nQ, 1], or [B, 1, nQ, 1] with segment ids: the query tiles that attend densely, those
    from floor((1 - dense_last_fraction) * n) on, n the tiles of the sequence or of the tile's
    (first) document."""
    bs = options.block_size
    n_q = -(-seq_len // bs)
    # Python's float floor for every possible count, so packed rows round as a document alone does.
    first_dense = np.array([math.floor((1.0 - options.dense_last_fraction) * n) for n in range(n_q + 1)])
    if segment_ids is None:
        return (np.arange(n_q) >= first_dense[n_q])[:, None]
    offset, length = document_spans(segment_ids)
    tile_starts = jnp.arange(0, seq_len, bs)
    index, count = offset[:, tile_starts] // bs, -(-length[:, tile_starts] // bs)   # [B, nQ]
    return (index >= jnp.asarray(first_dense)[count])[:, None, :, None]


def token_gate_scores(q: jax.Array, k: jax.Array, *, moba_block: int,
                      segment_ids: jax.Array | None = None) -> jax.Array:
    """float32 [B, N, T, nR]: each query token's gate, <q_t, mean K of the block>, the mean over the
    block's last document as in `gate_scores`."""
    k_mean = pool_blocks(k, moba_block, tokens=block_document_tokens(segment_ids, moba_block, "last"))
    k_mean = jnp.repeat(k_mean, q.shape[2] // k.shape[2], axis=2)          # [B, nR, N, H]
    return jnp.einsum("BTNH,BRNH->BNTR", q.astype(jnp.float32), k_mean, precision=jax.lax.Precision.HIGHEST)


def _document_first(segment_ids: jax.Array | None, seq_len: int, block: int):
    """int [B, 1, T, 1]: the block (of `block` tokens) holding each token's document start; 0 when
    documents are not masked."""
    if segment_ids is None:
        return 0
    return (document_starts(segment_ids) // block)[:, None, :, None]


def token_routing(scores: jax.Array, topk: int, seq_len: int, moba_block: int,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [B, N, T, nR]: per token, its current routing block and the `topk - 1` best strictly
    earlier ones of its document (ties to the lower index)."""
    r = jnp.arange(scores.shape[-1])
    valid = (r[None, :] <= (jnp.arange(seq_len) // moba_block)[:, None]) & (r >= _document_first(segment_ids, seq_len, moba_block))
    return ops.topk_block_mask(scores, topk, force_first=0, force_local=1, valid=valid)


def token_tile_mask(routing: jax.Array, seq_len: int, options: MobaOptions,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [B, N, T, nK]: `tile_mask` for rows of tokens: the key tiles of each token's routing
    blocks up to its own tile, its dense tiles if its tile is dense, and the forced ones."""
    o = options
    j, t = jnp.arange(-(-seq_len // o.block_size)), jnp.arange(seq_len)
    causal = (j[None, :] <= (t // o.block_size)[:, None]) & (j >= _document_first(segment_ids, seq_len, o.block_size))
    mask = jnp.take(routing, j * o.block_size // o.moba_block, axis=-1) & causal
    forced = ops.forced_block_mask(causal, force_first=o.initial_blocks, force_local=o.local_blocks)
    tile_rows = dense_rows(seq_len, o, segment_ids)                       # per query tile
    token_rows = jnp.take(tile_rows, t // o.block_size, axis=-2)
    return mask | (token_rows & causal) | forced


class MobaAttention(SparseMethod):
    """Parameter-free routing to blocks by mean key, per query head."""

    def select(self, inp: AttentionInputs) -> ops.Selection:
        o = self.options
        seq = inp.q.shape[1]
        q, k = jax.lax.stop_gradient((inp.q, inp.k))    # top-k routing: no gradient, as in the paper
        if o.granularity == "token":
            scores = token_gate_scores(q, k, moba_block=o.moba_block, segment_ids=inp.segment_ids)
            routing = token_routing(scores, o.topk, seq, o.moba_block, inp.segment_ids)
            mask = token_tile_mask(routing, seq, o, inp.segment_ids)
            mask = jnp.broadcast_to(mask, scores.shape[:3] + mask.shape[-1:])
            n_k = mask.shape[-1]
            width = n_k if o.dense_last_fraction else min(n_k, o.topk * o.moba_block // o.block_size
                                                          + o.initial_blocks + o.local_blocks)
            return ops.Selection.from_mask(mask, width, granularity="token")
        scores = gate_scores(q, k, block_size=o.block_size, moba_block=o.moba_block, query_pool=o.query_pool,
                             segment_ids=inp.segment_ids)
        routing = select_routing(scores, o.topk, seq, o.block_size, o.moba_block, inp.segment_ids)
        mask = tile_mask(routing, seq, o, inp.segment_ids)
        return ops.Selection.from_mask(mask, scores=scores)
