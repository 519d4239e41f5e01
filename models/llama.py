"""Llama-style decoder-only transformer in Flax NNX.

    tokens [B, T] -> embed -> L x Block -> RMSNorm -> hidden states [B, T, D]   (hidden_states)
                                                  -> lm_head -> logits [B, T, V] float32   (logits)

Each layer's attention is the module its attention rule builds (`model.attention`, one method's
options per rule; the registry is `sparsetrain.attention.spec.METHODS`). Layers are a list (`layers/<i>/...` parameter paths) or, with
`scan_layers=True`, one stacked Block scanned over a leading "layers" axis (faster compiles for deep
models; all layers must then share one attention rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import RESIDUAL, Block, RMSNorm, logits_matmul, param
from sparsetrain.attention.method import StepContext
from sparsetrain.config import ModelConfig
from sparsetrain.partitioning import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_forward(block: Block, x, positions, segment_ids, ctx):
    return block(x, positions, segment_ids, ctx)


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        specs = cfg.layer_specs
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(r):
                return Block(cfg, specs[0], r)
            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([Block(cfg, spec, rngs) for spec in specs])
        self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, ctx: StepContext | None = None) -> jax.Array:
        """tokens int32 [B, T]; positions [B, T] (default 0..T-1); ctx: the step's context (default:
        evaluation at step 0); returns float32 logits [B, T, V]."""
        return self.logits(self.hidden_states(tokens, positions, segment_ids, ctx))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, ctx: StepContext | None = None) -> jax.Array:
        """The final norm's output [B, T, D] in the compute dtype: everything but the output head."""
        cfg = self.cfg
        ctx = StepContext() if ctx is None else ctx
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype), RESIDUAL)
        forward = _block_forward
        if cfg.remat != "none":
            forward = nnx.remat(_block_forward, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run_stack(block, h):
                return forward(block, h, positions, segment_ids, ctx)
            x = run_stack(self.layers, x)
        else:
            for block in self.layers:
                x = forward(block, x, positions, segment_ids, ctx)
        return self.final_norm(x)

    def head_weight(self) -> jax.Array:
        """The output head's float32 master weight [D, V] (the embedding's transpose when tied)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def logits(self, h: jax.Array) -> jax.Array:
        """The output head: float32 logits [B, T, V] of hidden states [B, T, D], or [S, V] of a
        chunk of S tokens [S, D] (the chunked loss)."""
        return head_logits(h, self.head_weight(), jnp.dtype(self.cfg.dtype))


def head_logits(h: jax.Array, head: jax.Array, dtype) -> jax.Array:
    """float32 logits [..., V] of hidden states [..., D] under the head's master weight [D, V],
    computed in `dtype`. The weight is cast here, per call: a chunked loss then accumulates the
    head's gradient over chunks in float32."""
    logits = logits_matmul(h, head, dtype)
    # [B, T, V] keeps the residual stream's split; a chunk [S, V] of the chunked loss mixes batch and T.
    return constrain(logits, (("batch", "sequence") if logits.ndim == 3 else ("batch",)) + ("vocab",))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
