"""What every sparse method shares: its inputs, the step context, the loss/metric channels, the
block-sparse options and the `SparseMethod` module base.

A method's forward is a fixed sequence, each step overridable:

    select(inp) -> Selection          which key blocks each row attends to (sparsetrain.ops helpers)
    attend(inp, sel) -> out           default: the block-sparse kernel, run per shard under a mesh
    losses(inp, sel, out) -> {name: already-weighted scalar}   trained on, summed by the train step
    metrics(inp, sel, out) -> {name: scalar}                   logged only (density, recall, ...)

Axis legend: B batch, T sequence, D model width, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pallas_kernels.block_sparse.common import BLOCK_SIZES
from sparsetrain import ops
from sparsetrain.attention.alignment import alignment_loss, use_full_output
from sparsetrain.attention.dense import dense_causal_attention
from sparsetrain.attention.sharded import block_attention_scores, block_sparse_attention
from sparsetrain.attention.spec import MethodOptions


@struct.dataclass
class StepContext:
    """Per-step facts a method may read: the step, whether this is training, a fresh rng key, and
    the run phase a schedule sets (static: changing it retraces)."""

    step: jax.Array = struct.field(default_factory=lambda: jnp.int32(0))
    rng: jax.Array | None = None
    train: bool = struct.field(pytree_node=False, default=False)
    phase: int = struct.field(pytree_node=False, default=0)   # index in trainer.phases (0: the run's own)


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Everything a layer's attention may use; adding an input never changes a signature."""

    q: jax.Array            # [B, T, N, H] after RoPE
    k: jax.Array            # [B, T, K, H] after RoPE
    v: jax.Array            # [B, T, K, H]
    q_nope: jax.Array       # [B, T, N, H] before RoPE (gates pool these)
    k_nope: jax.Array       # [B, T, K, H] before RoPE
    x: jax.Array            # [B, T, D] the layer's normalised input
    positions: jax.Array    # [B, T] int32
    # [B, T] document ids of packed sequences (0 = padding), or None when attention crosses
    # documents. Every method attends within documents and keeps its selection, gates and block
    # scores inside them (sparsetrain/attention/documents.py).
    segment_ids: jax.Array | None
    ctx: StepContext
    rope: Callable[[jax.Array, jax.Array], jax.Array]   # the model's RoPE: (x [B, T', M, d], positions [B, T'])

    # The fields with one entry per token on axis 1: a context split reorders exactly these (a new
    # per-token input joins this list).
    PER_TOKEN: ClassVar[tuple[str, ...]] = ("q", "k", "v", "q_nope", "k_nope", "x", "positions", "segment_ids")

    def reordered(self, fn: Callable[[jax.Array | None], jax.Array | None]) -> "AttentionInputs":
        """These inputs with `fn` applied to every per-token field (e.g. `context_parallel.to_natural`)."""
        return dataclasses.replace(self, **{name: fn(getattr(self, name)) for name in self.PER_TOKEN})


class AuxLoss(nnx.Intermediate):
    """A weighted auxiliary loss reported by a layer; the train step adds it to the objective."""


class AuxMetric(nnx.Intermediate):
    """A value reported by a layer for logging only (never differentiated)."""


@dataclasses.dataclass(frozen=True)
class BlockSparseOptions(MethodOptions):
    """Fields every block-sparse method shares."""

    # "xla": the kernels' pure-jnp reference; "pallas_tpu": the Mosaic TPU kernels (needs
    # block_size=128; in the TPU interpreter off a TPU); "auto"/"pallas": the platform's kernel;
    # "mosaic_gpu": the Mosaic GPU forward with the Triton backward (Hopper, block_size=64).
    impl: Literal["auto", "pallas", "pallas_tpu", "mosaic_gpu", "xla"] = "auto"
    block_size: int = 64        # tokens per selection block; one of the kernel's tiles
    # Blocks every query block keeps whatever is selected: the last `local_blocks` key blocks up
    # to its own (the diagonal) and the first `initial_blocks` (attention sinks).
    local_blocks: int = 1
    initial_blocks: int = 0
    # Also measure recall (dense attention mass inside the selection) while training; it always is
    # at evaluation. Costs one block-score pass (about 1.7x a dense forward).
    recall_in_training: bool = False
    # SSA alignment in training (sparsetrain/attention/alignment.py): compute the full output too,
    # add ssa_weight * (SmoothL1(full, sg(sparse)) + SmoothL1(sg(full), sparse)), and feed the next
    # layer one of the two by a per-step coin flip. Evaluation stays sparse.
    ssa: bool = False
    ssa_weight: float = 10.0
    # BLASST (arXiv 2512.12087): None, or lambda in [0, 1): the kernel skips a selected tile whose
    # every row has exp(tile max - running max) < lambda (`ops.block_sparse_attention`); the share
    # of selected tiles it skipped is the metric "skipped". Tile selections only.
    skip_threshold: float | None = None

    # Option sets, besides the defaults, that the conformance suite (tests/sparse/) must also
    # cover: {name: field overrides}, e.g. each mode of a method.
    conformance_variants: ClassVar[dict[str, dict]] = {}
    # Field overrides under every case of the suite, defaults included (for methods whose defaults
    # do not fit its tiny models and 16-token blocks).
    conformance_base: ClassVar[dict] = {}

    def full_budget(self) -> "BlockSparseOptions | None":
        """These options changed so that every causal tile is computed through the method's own
        path (the conformance suite checks that this equals dense attention); None for methods
        whose output is not plain attention at any budget (NSA's gated branches)."""
        raise NotImplementedError

    def validate(self) -> None:
        super().validate()
        self.require(self.block_size in BLOCK_SIZES, "block_size",
                     f"choose one of {BLOCK_SIZES} (the block-sparse kernel's tiles)")
        # At least the diagonal block, so that every query sees itself and no row is empty.
        self.require(self.local_blocks >= 1, "local_blocks", "must be >= 1 (the diagonal block)")
        self.require(self.initial_blocks >= 0, "initial_blocks", "must be >= 0")
        self.require(self.ssa_weight > 0, "ssa_weight", "must be > 0")
        self.require(self.skip_threshold is None or 0 <= self.skip_threshold < 1, "skip_threshold",
                     "must be None (off) or in [0, 1) (BLASST's lambda)")


def skipped_share(skipped: jax.Array, tiles: jax.Array, block_size: int) -> jax.Array:
    """BLASST's metric: skipped tiles (bool [B, N, nQ, nK]) over the causal tiles selected by
    `tiles` (bool [B, H, nQ, nK], H dividing N), f32."""
    causal = ops.causal_block_mask(tiles.shape[2] * block_size, tiles.shape[3] * block_size, block_size)
    selected = (tiles & causal).sum() * (skipped.shape[1] // tiles.shape[1])
    return skipped.sum() / jnp.maximum(selected, 1)


class SparseMethod(nnx.Module):
    """Base of block-sparse attention modules (see the module docstring for the call sequence)."""

    def __init__(self, options: BlockSparseOptions, num_heads: int, num_kv_heads: int, head_dim: int):
        self.options = options
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def __call__(self, inp: AttentionInputs) -> jax.Array:
        sel = self.select(inp)
        out = self.attend(inp, sel)
        losses, metrics = {}, {}
        if self.reporting:
            losses, metrics = self.losses(inp, sel, out), self.metrics(inp, sel, out)
        if self.options.ssa and inp.ctx.train:
            out = self.align(inp, out, losses, metrics)
        if self.reporting:
            for name, value in losses.items():
                self.sow(AuxLoss, name, value)
            for name, value in metrics.items():
                self.sow(AuxMetric, name, jax.lax.stop_gradient(value))
        return out

    def align(self, inp: AttentionInputs, sparse: jax.Array, losses: dict, metrics: dict) -> jax.Array:
        """SSA: the alignment loss between the full and the sparse output, and this step's choice
        of which one continues."""
        if inp.ctx.rng is None:
            raise ValueError("ssa=True needs the step's rng (StepContext.rng) in training")
        full = dense_causal_attention(inp.q, inp.k, inp.v, segment_ids=inp.segment_ids)
        use_full = use_full_output(inp.ctx.rng)
        losses["ssa"] = self.options.ssa_weight * alignment_loss(full, sparse)
        metrics["ssa_full_output"] = use_full.astype(jnp.float32)
        return jnp.where(use_full, full, sparse)

    @property
    def reporting(self) -> bool:
        """Whether a caller collects losses and metrics (`nnx.capture`, as the train and eval steps
        do). Plain inference calls skip computing them."""
        return hasattr(self, "__captures__")

    def select(self, inp: AttentionInputs) -> ops.Selection:
        raise NotImplementedError

    def attend(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        # Token selections go to the token-level kernel as lists; tile ones as their mask.
        rows = sel if sel.granularity == "token" else sel.to_mask()
        return self.kernel_attention(inp, rows)

    def kernel_attention(self, inp: AttentionInputs, rows, key_bias: jax.Array | None = None) -> jax.Array:
        """The block-sparse kernel over `rows` (a tile mask or a token Selection) with the options'
        BLASST threshold, reporting the share of selected tiles it skipped; key_bias [B, K, T] or None."""
        o = self.options
        kw = dict(segment_ids=inp.segment_ids, causal=True, block_size=o.block_size, impl=o.impl, key_bias=key_bias)
        if o.skip_threshold is None:
            return block_sparse_attention(inp.q, inp.k, inp.v, rows, **kw)
        out, skipped = block_sparse_attention(inp.q, inp.k, inp.v, rows, skip_threshold=o.skip_threshold,
                                              return_skipped=True, **kw)
        if self.reporting:
            self.sow(AuxMetric, "skipped", jax.lax.stop_gradient(skipped_share(skipped, rows, o.block_size)))
        return out

    def losses(self, inp: AttentionInputs, sel: ops.Selection, out: jax.Array) -> dict:
        return {}

    def metrics(self, inp: AttentionInputs, sel: ops.Selection, out: jax.Array) -> dict:
        """Measured density always; recall at evaluation, or in training when asked. Recall of a
        tile selection is its share of the block-pooled map (`block_scores`); of a token selection,
        the share of each token's attention probability inside its blocks (`attention_mass`)."""
        seq_q, seq_kv, bs = inp.q.shape[1], inp.k.shape[1], self.options.block_size
        mask = sel.to_mask()
        values = {"density": ops.selection_density(mask, seq_q, seq_kv, bs, sel.granularity)}
        if self.wants_scores(inp):
            values["recall"] = (self.attention_mass(inp, sel) if sel.granularity == "token"
                                else ops.selection_recall(mask, self.block_scores(inp)))
        return values

    def attention_mass(self, inp: AttentionInputs, sel: ops.Selection) -> jax.Array:
        """Mean over tokens and heads of exp(lse over the selected keys - lse over all causal keys):
        the dense softmax probability a token's selection holds (no gradient)."""
        q, k, v = jax.lax.stop_gradient((inp.q, inp.k, inp.v))
        kw = dict(causal=True, block_size=self.options.block_size, impl=self.options.impl, return_lse=True,
                  segment_ids=inp.segment_ids)
        causal = ops.causal_block_mask(q.shape[1], k.shape[1], self.options.block_size)
        everything = jnp.broadcast_to(causal, (q.shape[0], k.shape[2], *causal.shape))
        _, lse_selected = block_sparse_attention(q, k, v, dataclasses.replace(sel, extras={}), **kw)
        _, lse_all = block_sparse_attention(q, k, v, everything, **kw)
        return jnp.mean(jnp.exp(lse_selected - lse_all))

    def wants_scores(self, inp: AttentionInputs) -> bool:
        """Recall is measured at evaluation, or in training when the options ask for it."""
        return self.reporting and (not inp.ctx.train or self.options.recall_in_training)

    def block_scores(self, inp: AttentionInputs) -> jax.Array:
        """SeerAttention's block ground truth of this layer, f32 [B, N, nQ, nK] (no gradient)."""
        return block_attention_scores(inp.q, inp.k, segment_ids=inp.segment_ids,
                                      block_size=self.options.block_size, causal=True, impl=self.options.impl)
