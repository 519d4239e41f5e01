"""method="nsa": Native Sparse Attention (DeepSeek, arXiv 2502.11089), method notes §2.

Each query token attends through three branches, mixed by learned gates:

    o_t = g_cmp * Attn(q_t, compressed K/V) + g_slc * Attn(q_t, selected blocks) + g_win * Attn(q_t, window)

* Gates: sigmoid of one Linear of the layer input x to 3 values per query head (`gate` [D, N, 3],
  order compression, selection, window, as fla-org's and the full reference's).
* Compression (sparsetrain/sparse/nsa_compression.py): keys and values compressed by phi over
  windows of `kernel_size` tokens at stride `kernel_stride` (phi: `mlp` with an intra-block position
  embedding on keys, the paper; `linear`, the full reference's; or `mean`, fla-org's), computed from
  the pre-RoPE keys, then RoPE at each window's start position. Compressed token i is visible to
  query t iff t >= i*stride + kernel_size - 1; rows with none visible give 0.
* Selection: importance is the compression branch's softmax probabilities, summed over the GQA
  group (one selection per kv head), mapped to blocks of `block_size` tokens with the paper's
  overlap weights. Per token, `initial_blocks` (the document's first) and `local_blocks` ending at
  its own block (current and previous at the defaults) are forced and the best others fill `topk`
  blocks in all, ties to the lower block; selection is discrete (no gradient through top-k).
  Attention over the raw tokens of the chosen blocks runs on the token-level kernel.
* Sliding window: the last `window` tokens (the kernel's token-precise window over the band of
  tiles that can hold them).
* `separate_kv=True` (the paper's default, against shortcut learning): the compression and window
  branches project x with their own K/V weights; the selection branch uses the layer's k and v.
  With False, all three use the layer's.

Packed documents (segment ids): a compressed token counts only if its window starts inside the
query's document, blocks holding none of the query's document are never candidates, and the
selection and window kernels mask by document. Windows and blocks lie on the row's grid (multiples
of the stride / block size from the row's start), so a document that starts off that grid is
compressed and blocked differently from the same document alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsetrain import ops
from sparsetrain.attention.documents import document_starts, token_candidate_blocks
from sparsetrain.attention.method import AttentionInputs, BlockSparseOptions, SparseMethod
from sparsetrain.attention.sharded import block_sparse_attention
from sparsetrain.attention.spec import MethodExport
from sparsetrain.ops.compressed_scores import token_block_scores
from sparsetrain.sparse.nsa_compression import compress, compressed_attention, compressor_shapes

BRANCHES = ("cmp", "slc", "win")   # order of the gate's last axis
PROJECTIONS = ("k_cmp_proj", "v_cmp_proj", "k_win_proj", "v_win_proj")   # with separate_kv


@dataclasses.dataclass(frozen=True)
class NsaOptions(BlockSparseOptions):
    method: str = "nsa"
    kernel_size: int = 32        # l: tokens per compressed key/value
    kernel_stride: int = 16      # d: stride of the compression windows; divides l and block_size
    compressor: Literal["mlp", "linear", "mean"] = "mlp"   # phi
    compressor_hidden: int = 128  # hidden width of the mlp compressor
    topk: int = 16               # n: selected blocks of block_size (l') per token, forced ones included
    initial_blocks: int = 1
    local_blocks: int = 2        # the token's own block and the one before
    window: int = 512            # w: sliding-window tokens (the token itself included)
    separate_kv: bool = True     # own K/V projections for the compression and window branches
    score_chunk: int = 1024      # queries per step of the scores' XLA reference (memory: chunk x T/stride per head)

    # The suite runs at block_size 16 and ~100 tokens: every case scales l, d, n and w to that.
    conformance_base = {"kernel_size": 8, "kernel_stride": 4, "topk": 4, "window": 24, "score_chunk": 32,
                        "compressor_hidden": 16}
    conformance_variants = {
        "linear_shared": {"compressor": "linear", "separate_kv": False},
        # fla-org's simplified NSA: mean pooling over non-overlapping windows of one block.
        "mean_blocks": {"compressor": "mean", "kernel_size": 16, "kernel_stride": 16},
    }
    export = MethodExport(torch_impl="nsa",
                          fields=("block_size", "local_blocks", "initial_blocks", "kernel_size", "kernel_stride",
                                  "compressor", "compressor_hidden", "topk", "window", "separate_kv"))
    context_parallel = ("all_gather",)

    def validate(self) -> None:
        super().validate()
        for name in ("kernel_size", "kernel_stride", "topk", "window", "score_chunk", "compressor_hidden"):
            self.require(getattr(self, name) > 0, name, "must be > 0")
        self.require(self.kernel_size % self.kernel_stride == 0, "kernel_stride",
                     f"must divide kernel_size={self.kernel_size}")
        self.require(self.block_size % self.kernel_stride == 0, "kernel_stride",
                     f"must divide block_size={self.block_size}")
        self.require(self.kernel_size <= self.block_size, "kernel_size",
                     f"must be <= block_size={self.block_size} (l <= l')")
        self.require(self.topk >= self.initial_blocks + self.local_blocks, "topk",
                     f"must be >= initial_blocks + local_blocks = {self.initial_blocks + self.local_blocks} "
                     f"(the forced blocks count inside it)")

    def full_budget(self) -> None:
        """None: NSA's output is a gated sum of three branches, never plain dense attention. Each
        branch's full budget (selection with every block, window over every token) is checked
        against dense attention in tests/sparse/test_nsa.py."""
        return None

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs) -> "NsaAttention":
        return NsaAttention(self, num_heads, num_kv_heads, head_dim, model_dim, rngs)

    def export_params(self) -> dict[str, tuple[str, str]]:
        return {name: (name, "identity") for name in parameter_shapes(self, 1, 1, 1, 1)}

    def density(self, seq_len: int) -> float:
        """Attention work of the three branches against dense causal attention, per query token:
        min(topk blocks, its causal keys) + min(window, its keys) + its visible compressed keys.
        Above 1 at short lengths, where the branches overlap."""
        t = np.arange(seq_len)
        selected = np.minimum(self.topk * self.block_size, t + 1)
        window = np.minimum(self.window, t + 1)
        compressed = np.maximum(0, (t - self.kernel_size + 1) // self.kernel_stride + 1)
        return float((selected + window + compressed).sum() / (t + 1).sum())


def parameter_shapes(o: NsaOptions, num_heads: int, num_kv_heads: int, head_dim: int,
                     model_dim: int) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a layer's NSA parameters ("k_phi_w1" names the key compressor's w1)."""
    shapes = {"gate": (model_dim, num_heads, len(BRANCHES))}
    if o.separate_kv:
        shapes.update({name: (model_dim, num_kv_heads, head_dim) for name in PROJECTIONS})
    for kv in ("k", "v"):
        phi = compressor_shapes(o.compressor, o.kernel_size, head_dim, num_kv_heads, o.compressor_hidden,
                                position=kv == "k")
        shapes.update({f"{kv}_phi_{name}": shape for name, shape in phi.items()})
    return shapes


def select_blocks(scores: jax.Array, rows: jax.Array, o: NsaOptions, doc_start: jax.Array | None = None):
    """Each query token's blocks from its block scores [B, K, C, nK] as sorted lists (indices
    [B, K, C, topk], counts [B, K, C]); rows [C] are the tokens' indices, doc_start [B, C] their
    documents' first indices (or None)."""
    valid = token_candidate_blocks(rows, scores.shape[-1], o.block_size, doc_start)
    return ops.topk_block_lists(scores, o.topk, force_first=o.initial_blocks, force_local=o.local_blocks,
                                valid=valid)


# Logical axes of the parameters (sharding): heads split like the attention heads they serve.
_AXES = {"gate": ("embed", "heads", None), "proj": ("embed", "kv_heads", "head_dim"),
         "phi": ("kv_heads", None, None)}


class NsaAttention(SparseMethod):
    def __init__(self, options: NsaOptions, num_heads, num_kv_heads, head_dim, model_dim, rngs: nnx.Rngs):
        super().__init__(options, num_heads, num_kv_heads, head_dim)
        init = nnx.initializers.normal(0.02)
        for name, shape in parameter_shapes(options, num_heads, num_kv_heads, head_dim, model_dim).items():
            axes = _AXES["gate" if name == "gate" else "phi" if "_phi_" in name else "proj"]
            setattr(self, name, nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes,
                                          eager_sharding=False))

    def project(self, x: jax.Array, name: str) -> jax.Array:
        return jnp.einsum("BTD,DKH->BTKH", x, getattr(self, name)[...].astype(x.dtype))

    def phi(self, kv: str) -> dict[str, jax.Array]:
        """The weights of the key ("k") or value ("v") compressor, by their names in `compress`."""
        prefix = f"{kv}_phi_"
        return {name[len(prefix):]: getattr(self, name)[...] for name in vars(self) if name.startswith(prefix)}

    def branch_kv(self, inp: AttentionInputs, branch: str) -> tuple[jax.Array, jax.Array]:
        """(keys before RoPE, values) of the compression or window branch."""
        if not self.options.separate_kv:
            return inp.k_nope, inp.v
        return self.project(inp.x, f"k_{branch}_proj"), self.project(inp.x, f"v_{branch}_proj")

    def compressed_kv(self, inp: AttentionInputs) -> tuple[jax.Array, jax.Array]:
        """Compressed keys (RoPE at each window's start position) and values, [B, I, K, H]."""
        o = self.options
        k, v = self.branch_kv(inp, "cmp")
        kc = compress(k, o.compressor, o.kernel_size, o.kernel_stride, self.phi("k"))
        vc = compress(v, o.compressor, o.kernel_size, o.kernel_stride, self.phi("v"))
        n = kc.shape[1]
        return inp.rope(kc, inp.positions[:, :n * o.kernel_stride:o.kernel_stride]), vc

    def select(self, inp: AttentionInputs) -> ops.Selection:
        """The compression branch's output (kept in the selection's extras for `attend`) and, from
        its probabilities, each token's selected blocks per kv head."""
        o = self.options
        seq = inp.q.shape[1]
        kc, vc = self.compressed_kv(inp)
        scale = 1.0 / math.sqrt(self.head_dim)
        compressed, _ = compressed_attention(inp.q, kc, vc, size=o.kernel_size, stride=o.kernel_stride,
                                             sm_scale=scale, segment_ids=inp.segment_ids, impl=o.impl)
        doc_start = None if inp.segment_ids is None else document_starts(inp.segment_ids)
        # The same probabilities, summed over each GQA group and pooled onto blocks (no gradient).
        scores = token_block_scores(
            inp.q, kc, kc, block_size=o.block_size, kernel_size=o.kernel_size, kernel_stride=o.kernel_stride,
            coarse_size=o.kernel_size, coarse_stride=o.kernel_stride, doc_start=doc_start, sm_scale=scale,
            query_chunk=o.score_chunk, pool="overlap", impl=o.impl)
        indices, counts = select_blocks(scores, jnp.arange(seq), o, doc_start)
        return ops.Selection(indices, counts, -(-seq // o.block_size), {"compressed": compressed}, "token")

    def attend(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        gates = self.gates(inp.x)
        out = sum(gates[..., i, None] * branch.astype(jnp.float32) for i, branch in enumerate(self.branches(inp, sel)))
        return out.astype(inp.q.dtype)

    def branches(self, inp: AttentionInputs, sel: ops.Selection) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The compression, selection and window outputs, [B, T, N, H] each."""
        return sel.extras["compressed"], self.selection_branch(inp, sel), self.window_branch(inp)

    def selection_branch(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        """The raw tokens of each token's selected blocks (the token-level kernel)."""
        return super().attend(inp, dataclasses.replace(sel, extras={}))

    def window_branch(self, inp: AttentionInputs) -> jax.Array:
        """The last `window` tokens: the kernel's token-precise window over the band of tiles."""
        o = self.options
        seq = inp.q.shape[1]
        k_win, v_win = self.branch_kv(inp, "win")
        k_win = inp.rope(k_win, inp.positions) if o.separate_kv else inp.k
        band = ops.window_block_mask(seq, seq, o.block_size, o.window)
        band = jnp.broadcast_to(band, (inp.q.shape[0], self.num_kv_heads, *band.shape))
        return block_sparse_attention(inp.q, k_win, v_win, band, segment_ids=inp.segment_ids, causal=True,
                                      block_size=o.block_size, impl=o.impl, window=o.window)

    def gates(self, x: jax.Array) -> jax.Array:
        """f32 [B, T, N, 3]: each query head's weight of the three branches."""
        return jax.nn.sigmoid(jnp.einsum("BTD,DNC->BTNC", x, self.gate[...].astype(x.dtype)).astype(jnp.float32))

    def metrics(self, inp: AttentionInputs, sel: ops.Selection, out: jax.Array) -> dict:
        """The base metrics (density and recall of the selection branch) and each branch's mean gate."""
        values = super().metrics(inp, sel, out)
        gates = self.gates(inp.x).mean(axis=(0, 1, 2))
        values.update({f"gate_{name}": gates[i] for i, name in enumerate(BRANCHES)})
        return values
