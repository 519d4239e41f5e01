"""The one attention dispatcher: turns a layer's AttentionSpec into the module that computes it.

Every attention module has the call signature

    module(q, k, v, *, q_raw, k_raw, segment_ids) -> out

with q [B, T, N, H] and k, v [B, T, K, H] after RoPE, q_raw/k_raw the same before RoPE (gates such as
SeerAttention's pool pre-RoPE channels), segment_ids [B, T] (document ids of packed sequences, 0 = pad),
and out [B, T, N, H]. Modules with learned parts own their parameters (so they are checkpointed and
exported with the layer) and report auxiliary losses with `report_aux_loss`.
"""

from __future__ import annotations

import jax
from flax import nnx

from sparsetrain.attention.dense import DenseAttention
from sparsetrain.attention.local_blocks import LocalBlockAttention
from sparsetrain.attention.spec import METHODS, AttentionSpec


class AuxLoss(nnx.Intermediate):
    """An auxiliary loss reported by a layer; the train step sums them with configured weights."""


def report_aux_loss(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Record a scalar loss under `name` (one entry per layer; the loop averages over layers)."""
    module.sow(AuxLoss, name, value)


# method -> its module class. Each class has `build(spec, num_heads, num_kv_heads, head_dim, rngs)`
# and `density(spec, seq_len)`: the fraction of causal (query, key) pairs it computes, for FLOP counts.
_METHOD_CLASSES: dict[str, type] = {
    "dense": DenseAttention,
    "local": LocalBlockAttention,
}
assert set(_METHOD_CLASSES) == set(METHODS), "spec.METHODS and the dispatcher must list the same methods"


def build_attention(spec: AttentionSpec, *, num_heads: int, num_kv_heads: int, head_dim: int,
                    rngs: nnx.Rngs) -> nnx.Module:
    """The attention module for one layer."""
    return _METHOD_CLASSES[spec.method].build(spec, num_heads, num_kv_heads, head_dim, rngs)


def attention_density(spec: AttentionSpec, seq_len: int) -> float:
    """Fraction of the causal attention work a layer with this spec does at `seq_len` (1.0 = dense).
    Methods that choose blocks at run time report their configured budget."""
    return _METHOD_CLASSES[spec.method].density(spec, seq_len)
