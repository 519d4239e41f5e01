"""Shared helpers for the sparse-method tests: attention inputs from q/k/v, tiny models."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.rope import apply_rope
from sparsetrain.attention.method import AttentionInputs, StepContext
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.config import ModelConfig, RopeConfig
from sparsetrain.data.examples import document_positions

TINY = ModelConfig(vocab_size=320, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128, max_seq_len=512, dtype="float32")


def qkv(seq, heads=4, kv_heads=2, head_dim=16, seed=0, batch=2):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim))
    return q, k, v


def inputs(q_nope, k_nope, v, *, train=False, theta=10000.0, segment_ids=None, rng=None,
           positions=None) -> AttentionInputs:
    """AttentionInputs as the model builds them: RoPE at positions 0..T-1, or with segment ids
    [B, T] at positions restarting per document (as the data pipeline makes them). Under jit,
    where segment ids are traced, pass those `positions` (`segment_positions`)."""
    if positions is None:
        positions = (jnp.broadcast_to(jnp.arange(q_nope.shape[1], dtype=jnp.int32), q_nope.shape[:2])
                     if segment_ids is None else segment_positions(segment_ids))
    rope = functools.partial(apply_rope, cfg=RopeConfig(theta=theta))
    return AttentionInputs(q=rope(q_nope, positions), k=rope(k_nope, positions), v=v, q_nope=q_nope,
                           k_nope=k_nope, x=layer_input(q_nope), positions=positions,
                           segment_ids=segment_ids, ctx=StepContext(train=train, rng=rng), rope=rope)


def segment_positions(segment_ids) -> jax.Array:
    """int32 [B, T]: positions restarting at 0 in each document of concrete segment ids [B, T]."""
    return jnp.asarray(np.stack([document_positions(row) for row in np.asarray(segment_ids)]))


MODEL_DIM = 8   # width of the layer input x the helpers give methods (NSA's gates project it)


def layer_input(q_nope) -> jax.Array:
    """The layer input x [B, T, MODEL_DIM] the helpers give methods: per token, the first features
    of its queries (random like them, and cutting a sequence cuts x the same way)."""
    return q_nope.reshape(*q_nope.shape[:2], -1)[..., :MODEL_DIM]


def layer(options, heads=4, kv_heads=2, head_dim=16, seed=0):
    return options.build(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, model_dim=MODEL_DIM,
                         rngs=nnx.Rngs(seed))


def tiny(rule, **changes) -> ModelConfig:
    """TINY with layer 0 dense and the rest under `rule`."""
    return dataclasses.replace(TINY, attention=(DenseOptions(), dataclasses.replace(rule, layers="1:")),
                               **changes)


def tokens(seq, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, seq)).astype(np.int32)
