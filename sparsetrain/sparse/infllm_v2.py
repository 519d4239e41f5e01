"""method="infllm_v2": InfLLM-V2 trainable dense-sparse switchable attention (OpenBMB, MiniCPM4;
arXiv 2509.24663), method notes §3.

No parameters: the layer reuses the dense layer's q, k, v. Each key block of `block_size` tokens is
scored per query token t and KV head from compressed keys, means of the post-RoPE K:
  * fine: windows of `kernel_size` tokens with stride `kernel_stride` (complete windows only);
  * coarse: windows of `coarse_size` with stride `coarse_stride`, whose logits give each token's
    approximate log-sum-exp lse_t,h (the paper's cheap LSE).
A fine window c is visible to t iff it ends at or before t (c*stride + size - 1 <= t), and the same
for coarse windows. The score of window c is sum over the GQA group of exp(q_t,h . k1_c * scale -
lse_t,h) (so one selection per KV head), and a block's score is the max over the fine windows that
overlap it (the reference's max-pool, window block/stride + 1, stride block/stride, padding 1, at its
defaults). Per row, `initial_blocks` and the `local_blocks` ending at the diagonal are forced, and the
best others fill a budget of `topk` blocks in all; selection gets no gradient (as upstream).
Tokens before the first complete coarse window have no LSE and score 0 (their blocks are all in the
forced local window at the defaults). With packed documents (segment ids), only windows starting
inside a token's document count, only blocks holding its document are candidates, and `dense_len`
compares positions inside the document.

Dense-sparse switch: a query at position p < `dense_len` (key length <= dense_len) attends densely. A
sequence of at most `dense_len` tokens therefore runs the dense layer itself, bit for bit (the
cuDNN/XLA call of `method="dense"`), so a model trained short and dense keeps exactly its behaviour
on short inputs. Longer sequences attend densely in their first dense_len positions and sparsely
after. The reference switches the whole prefill by kv length (kv_len < dense_len dense): our rule per
position agrees with it on short inputs and in cached decoding, and makes the output at a position
independent of how much follows it (the exported model decodes exactly with a KV cache).

Granularity: `granularity="token"` (default) selects per query token, as the paper, through the
token-level kernel (one list of key blocks per token and KV head). `granularity="tile"` selects per
query tile of `block_size` tokens for the tile kernel: tile i is scored with the sum of the per-token
block scores of the tokens of tile i-1 ("lagged": no token's selection reads a later token, so it
stays causal per token and cached decoding is exact), its own diagonal block and the local window
forced. What the tile form loses is measured by tests/sparse/test_infllm_v2.py and quoted in
docs/sparse_methods.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from sparsetrain import ops
from sparsetrain.attention.dense import dense_causal_attention
from sparsetrain.attention.documents import document_starts, document_tiles, token_candidate_blocks
from sparsetrain.attention.method import AttentionInputs, BlockSparseOptions, SparseMethod
from sparsetrain.attention.spec import MethodExport
from sparsetrain.ops.compressed_scores import token_block_scores
from sparsetrain.sparse.pooling import lag_blocks


@dataclasses.dataclass(frozen=True)
class InfllmV2Options(BlockSparseOptions):
    method: str = "infllm_v2"
    kernel_size: int = 32        # tokens per fine compressed key (mean of post-RoPE K), the score unit
    kernel_stride: int = 16      # stride of the fine windows; divides kernel_size and block_size
    coarse_size: int = 128       # tokens per coarse compressed key (only for the approximate LSE)
    coarse_stride: int = 64      # stride of the coarse windows; divides coarse_size
    topk: int = 96               # key blocks per query, the forced initial and local ones included
    initial_blocks: int = 1      # attention sinks (MiniCPM4: init_blocks=1)
    local_blocks: int = 32       # local window in blocks, the diagonal included (MiniCPM4: 2048 tokens)
    dense_len: int = 8192        # queries at positions < dense_len attend densely; a multiple of block_size
    granularity: Literal["token", "tile"] = "token"   # a selection per query token (the paper) or per tile
    score_chunk: int = 1024      # queries per step of the XLA scoring pass (memory chunk x T/stride per head)

    conformance_variants = {
        # The suite's lengths are far below the default dense_len (so "default" is the dense
        # regime); these exercise the sparse path, at sizes scaled to its 16-token blocks.
        "sparse": {"dense_len": 0, "kernel_size": 8, "kernel_stride": 4, "coarse_size": 16,
                   "coarse_stride": 8, "topk": 3, "local_blocks": 1, "score_chunk": 32},
        "switch": {"dense_len": 48, "kernel_size": 8, "kernel_stride": 4, "coarse_size": 16,
                   "coarse_stride": 8, "topk": 3, "local_blocks": 1, "score_chunk": 64},
        "tile": {"dense_len": 48, "kernel_size": 8, "kernel_stride": 4, "coarse_size": 16,
                 "coarse_stride": 8, "topk": 3, "local_blocks": 1, "granularity": "tile"},
    }
    export = MethodExport(torch_impl="infllm_v2",
                          fields=("block_size", "local_blocks", "initial_blocks", "kernel_size",
                                  "kernel_stride", "coarse_size", "coarse_stride", "topk", "dense_len",
                                  "granularity"))
    context_parallel = ("all_gather", "ring")

    def validate(self) -> None:
        super().validate()
        for name in ("kernel_size", "kernel_stride", "coarse_size", "coarse_stride"):
            self.require(getattr(self, name) > 0, name, "must be > 0")
        self.require(self.kernel_size % self.kernel_stride == 0, "kernel_size",
                     f"must be a multiple of kernel_stride={self.kernel_stride}")
        self.require(self.block_size % self.kernel_stride == 0, "kernel_stride",
                     f"must divide block_size={self.block_size}")
        self.require(self.kernel_size <= self.block_size + self.kernel_stride, "kernel_size",
                     f"must be <= block_size + kernel_stride = {self.block_size + self.kernel_stride} "
                     f"(a window overlaps at most one block before its own)")
        self.require(self.coarse_size % self.coarse_stride == 0, "coarse_size",
                     f"must be a multiple of coarse_stride={self.coarse_stride}")
        self.require(self.topk >= self.initial_blocks + self.local_blocks, "topk",
                     f"must be >= initial_blocks + local_blocks = {self.initial_blocks + self.local_blocks} "
                     f"(the forced blocks count inside it)")
        self.require(self.dense_len >= 0 and self.dense_len % self.block_size == 0, "dense_len",
                     f"must be >= 0 and a multiple of block_size={self.block_size} (tiles switch whole)")
        self.require(self.score_chunk > 0 and self.score_chunk % self.block_size == 0, "score_chunk",
                     f"must be a positive multiple of block_size={self.block_size}")

    def full_budget(self) -> "InfllmV2Options":
        return dataclasses.replace(self, topk=1 << 20)

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "InfllmV2Attention":
        return InfllmV2Attention(self, num_heads, num_kv_heads, head_dim)

    def density(self, seq_len: int) -> float:
        """The static budget: every sparse row keeps min(topk, its causal blocks), whichever they are."""
        if seq_len <= self.dense_len:
            return 1.0
        n = -(-seq_len // self.block_size)
        mask = select_blocks(jnp.zeros((n, n)), seq_len, dataclasses.replace(self, granularity="tile"))
        return float(ops.selection_density(mask, seq_len, seq_len, self.block_size))


# ------------------------------------------------------------------------------------------------
# Scoring and selection as plain functions (tests/sparse/test_infllm_v2.py checks them against a
# straightforward per-token reference of the method notes).

def window_means(k: jax.Array, size: int, stride: int) -> jax.Array:
    """[B, T, K, H] -> f32 [B, nW, K, H]: the means of the complete windows of `size` tokens at
    stride `stride` (nW = (T - size) // stride + 1, possibly 0). Sums of stride-chunks, no cumsum,
    so long sequences lose no precision."""
    b, t, kh, h = k.shape
    n_windows = max(0, (t - size) // stride + 1)
    per = size // stride
    n_chunks = n_windows + per - 1
    chunks = k[:, :n_chunks * stride].astype(jnp.float32).reshape(b, n_chunks, stride, kh, h).sum(2)
    total = sum(chunks[:, i:i + n_windows] for i in range(per))
    return total / size


def token_scores(q: jax.Array, k: jax.Array, o: InfllmV2Options, scale: float,
                 segment_ids: jax.Array | None = None) -> jax.Array:
    """f32 [B, K, T, nK]: every token's score of every key block, from `ops.compressed_scores` (a
    fused kernel on GPU, the chunked reference elsewhere); with packed documents, only the windows
    inside a token's document count."""
    doc_start = None if segment_ids is None else document_starts(segment_ids)
    return token_block_scores(
        q, window_means(k, o.kernel_size, o.kernel_stride), window_means(k, o.coarse_size, o.coarse_stride),
        block_size=o.block_size, kernel_size=o.kernel_size, kernel_stride=o.kernel_stride,
        coarse_size=o.coarse_size, coarse_stride=o.coarse_stride, doc_start=doc_start, sm_scale=scale,
        query_chunk=o.score_chunk, impl=o.impl)


def lagged_tile_scores(scores: jax.Array, block_size: int) -> jax.Array:
    """[B, K, T, nK] -> [B, K, nQ, nK]: tile i gets the summed scores of tile i-1's tokens (tile 0 zeros)."""
    b, kv, t, n_blocks = scores.shape
    scores = jnp.pad(scores, ((0, 0), (0, 0), (0, n_blocks * block_size - t), (0, 0)))
    per_tile = scores.reshape(b, kv, n_blocks, block_size, n_blocks).sum(3)
    return lag_blocks(per_tile.swapaxes(1, 2)).swapaxes(1, 2)


def select_blocks(scores: jax.Array, seq_len: int, o: InfllmV2Options, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [B or 1, ..., rows, nK], rows the query tiles or tokens of `o.granularity`: per row, the
    forced blocks plus the best-scoring others, `topk` in all (ties to the lower block); rows whose
    positions all lie below `dense_len` keep every block up to their own. positions [B, T] restart
    per packed document (default 0..T-1); with segment_ids, blocks holding none of a row's document
    are never candidates, so sinks and window count within the document."""
    bs, n_k = o.block_size, -(-seq_len // o.block_size)
    positions = jnp.arange(seq_len)[None] if positions is None else positions
    j = jnp.arange(n_k)
    if o.granularity == "tile":
        valid = (j[None, :] <= jnp.arange(n_k)[:, None]) & document_tiles(segment_ids, bs)
        padded = jnp.pad(positions, ((0, 0), (0, n_k * bs - seq_len)), mode="edge")
        row_position = padded.reshape(positions.shape[0], n_k, bs).max(-1)          # a tile's last
    else:
        doc_start = None if segment_ids is None else document_starts(segment_ids)
        valid = token_candidate_blocks(jnp.arange(seq_len), n_k, bs, doc_start)
        row_position = positions
    mask = ops.topk_block_mask(scores, o.topk, force_first=o.initial_blocks, force_local=o.local_blocks,
                               valid=valid)
    return mask | ((row_position < o.dense_len)[:, None, :, None] & valid)


class InfllmV2Attention(SparseMethod):
    """Block selection by compressed keys, shared per KV head; dense below `dense_len`."""

    def dense_regime(self, inp: AttentionInputs) -> bool:
        return inp.k.shape[1] <= self.options.dense_len

    def select(self, inp: AttentionInputs) -> ops.Selection:
        o = self.options
        b, seq = inp.q.shape[:2]
        if self.dense_regime(inp):
            causal = ops.causal_block_mask(seq, seq, o.block_size)
            return ops.Selection.from_mask(jnp.broadcast_to(causal, (b, self.num_kv_heads, *causal.shape)))
        q, k = jax.lax.stop_gradient((inp.q, inp.k))    # top-k selection: no gradient, as upstream
        scores = token_scores(q, k, o, 1.0 / math.sqrt(self.head_dim), inp.segment_ids)
        rows = dict(positions=inp.positions, segment_ids=inp.segment_ids)
        if o.granularity == "tile":
            mask = select_blocks(lagged_tile_scores(scores, o.block_size), seq, o, **rows)
            return ops.Selection.from_mask(jnp.broadcast_to(mask, scores.shape[:2] + mask.shape[2:]))
        # Dense rows (positions below dense_len) hold every block of theirs; sparse rows topk.
        width = min(-(-seq // o.block_size), max(o.topk, o.dense_len // o.block_size + 1))
        mask = jnp.broadcast_to(select_blocks(scores, seq, o, **rows), scores.shape)
        return ops.Selection.from_mask(mask, width, granularity="token")

    def attend(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        if self.dense_regime(inp):
            # The dense layer itself, bit for bit.
            return dense_causal_attention(inp.q, inp.k, inp.v, segment_ids=inp.segment_ids)
        return super().attend(inp, sel)
