"""Block-sparse ops on a device mesh: each kernel runs once per shard under `jax.shard_map`.

GSPMD cannot see inside a Pallas call, so left to itself it would gather q/k/v onto every device.
Attention is independent per batch row and per GQA group, so each device can run the kernel on its
own rows and heads: batch split over the data-parallel axes, heads over "tensor" (query and kv heads
split the same number of ways, so each query head stays with its kv head). Sparse methods call the
kernels through `block_sparse_attention`, `block_attention_scores` and `attention_with_block_scores`
here.

With a "context" mesh axis, sequences are split along T too, in the load-balanced order, and each
shard gathers the keys it needs (sparsetrain/attention/context_parallel.py); dense layers then run
`causal_attention` here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from sparsetrain import ops
from sparsetrain.attention import context_parallel
from sparsetrain.partitioning import logical_to_spec


def _active_mesh():
    """The mesh to split over, or None when there is nothing to split."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or all(size == 1 for size in mesh.shape.values()) else mesh


def _sequence_axis(mesh) -> str | None:
    """The mesh axis that splits T, or None."""
    return context_parallel.AXIS if dict(mesh.shape).get(context_parallel.AXIS, 1) > 1 else None


def _specs(q, k, heads_dim: int, mesh, seq: str | None = None):
    """(q spec, k/v spec, spec of an array with heads on axis 1 of size `heads_dim`), T split over
    `seq`. Heads are split only if every head count allows it."""
    batch = logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    heads = logical_to_spec(("heads",), q.shape[2:3], mesh)[0]
    kv_heads = logical_to_spec(("kv_heads",), k.shape[2:3], mesh)[0]
    other = logical_to_spec(("heads",), (heads_dim,), mesh)[0]
    if heads is None or kv_heads is None or other is None:
        heads = kv_heads = other = None
    return P(batch, seq, heads, None), P(batch, seq, kv_heads, None), P(batch, other, None, None)


def _per_shard(q, k, v, block_mask, segment_ids, mesh, key_bias=None, **kwargs):
    """The kernel under shard_map; with a context split, `context_parallel.shard_attention`.
    block_mask: a bool tile mask or a `Selection` (tile selections run as their mask); key_bias
    [B, K, S] or None, split like k's batch and heads."""
    seq = _sequence_axis(mesh)
    if key_bias is not None and seq is not None:
        raise NotImplementedError("key_bias (DMA, NOSA) under mesh.context > 1 is not supported yet; "
                                  "use mesh.context=1")
    token = isinstance(block_mask, ops.Selection) and block_mask.granularity == "token"
    if isinstance(block_mask, ops.Selection) and not token:
        block_mask = block_mask.to_mask()
    if token and seq is not None:
        raise NotImplementedError("mesh.context > 1 with token-level selections (InfLLM-V2, MoBA, NSA) is not "
                                  "supported yet; use granularity='tile' or mesh.context=1")
    heads = block_mask.indices.shape[1] if token else block_mask.shape[1]
    q_spec, kv_spec, mask_spec = _specs(q, k, heads, mesh, seq)
    if token:   # rows split like the mask's batch and heads; extras are the method's, not the kernel's
        block_mask = dataclasses.replace(block_mask, extras={})
        mask_spec = dataclasses.replace(block_mask, indices=mask_spec, counts=P(*mask_spec[:3]))
    out_specs = [q_spec]
    if kwargs.get("return_lse"):   # lse [B, N, T]: batch, heads, sequence
        out_specs.append(P(q_spec[0], q_spec[2], q_spec[1]))
    if kwargs.get("return_skipped"):   # BLASST's skipped tiles [B, N, nQ, nK]: batch, heads
        if seq is not None:
            raise NotImplementedError("skip_threshold (BLASST) under mesh.context > 1 is not supported yet; "
                                      "use mesh.context=1")
        out_specs.append(P(q_spec[0], q_spec[2], None, None))
    out_spec = tuple(out_specs) if len(out_specs) > 1 else q_spec
    if seq is None:
        kernel = lambda q, k, v, mask, seg, bias: ops.block_sparse_attention(q, k, v, mask, segment_ids=seg,
                                                                             key_bias=bias, **kwargs)
    else:
        kernel = lambda q, k, v, mask, seg, bias: context_parallel.shard_attention(q, k, v, mask, seg, **kwargs)
    # check_vma=False: the Pallas call has no varying-across-mesh typing rule. Segment ids [B, T]
    # split like q's batch and sequence (None is an empty operand), the key bias like k.
    bias_spec = P(kv_spec[0], kv_spec[2], None)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, mask_spec, P(q_spec[0], seq), bias_spec),
                         out_specs=out_spec, check_vma=False)(q, k, v, block_mask, segment_ids, key_bias)


def block_sparse_attention(q, k, v, block_mask, *, segment_ids=None, key_bias=None, **kwargs):
    """`sparsetrain.ops.block_sparse_attention` (same arguments and result), run per shard when a
    mesh is active and directly otherwise. With a context split, q/k/v are in the load-balanced
    order, `block_mask` and `segment_ids` in natural order (what the selection saw). A sliding
    `window` counts in natural positions on every path: shards hold whole sequences, or (context
    split) keys rolled so that each query chunk keeps its distance to every key it may see."""
    mesh = _active_mesh()
    if mesh is None:
        return ops.block_sparse_attention(q, k, v, block_mask, segment_ids=segment_ids, key_bias=key_bias,
                                          **kwargs)
    segment_ids = context_parallel.to_load_balanced(segment_ids)
    return _per_shard(q, k, v, block_mask, segment_ids, mesh, key_bias=key_bias, **kwargs)


def causal_attention(q, k, v, *, segment_ids=None, impl: str = "auto"):
    """Dense causal attention (within documents when `segment_ids` are given) of q/k/v in the
    load-balanced order of a context-split mesh: the block-sparse kernel over every causal tile,
    which is exact and skips the tiles above the diagonal. Shapes as `ops.block_sparse_attention`."""
    mesh = _active_mesh()
    block_size = context_parallel.dense_block_size(q.shape[1], context_parallel.context_size())
    tiles = context_parallel.causal_tiles(q.shape[1], k.shape[2], q.shape[0], block_size)
    return _per_shard(q, k, v, tiles, segment_ids, mesh, block_size=block_size, impl=impl)


def block_attention_scores(q, k, *, segment_ids=None, **kwargs):
    """`sparsetrain.ops.block_attention_scores`, run per shard when a mesh is active; in natural
    order under a context split (a metric: q and k are put back in natural order first; segment
    ids come in natural order, as for `block_sparse_attention`)."""
    mesh = _active_mesh()
    if mesh is None:
        return ops.block_attention_scores(q, k, segment_ids=segment_ids, **kwargs)
    q, k = map(context_parallel.to_natural, (q, k))
    q_spec, kv_spec, out_spec = _specs(q, k, q.shape[2], mesh)
    kernel = lambda q, k, seg: ops.block_attention_scores(q, k, segment_ids=seg, **kwargs)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, P(q_spec[0], None)), out_specs=out_spec,
                         check_vma=False)(q, k, segment_ids)


def attention_with_block_scores(q, k, v, *, segment_ids=None, **kwargs):
    """`sparsetrain.ops.attention_with_block_scores` (dense attention and its block scores), run
    per shard when a mesh is active: batch and heads split as for `block_attention_scores`. No
    context split (T stays whole): that mesh axis serves dense and local layers only."""
    mesh = _active_mesh()
    if mesh is None:
        return ops.attention_with_block_scores(q, k, v, segment_ids=segment_ids, **kwargs)
    if _sequence_axis(mesh) is not None:
        raise NotImplementedError("attention_with_block_scores under mesh.context > 1 is not supported; "
                                  "set the Seer layer's fused_scores=false")
    q_spec, kv_spec, scores_spec = _specs(q, k, q.shape[2], mesh)
    kernel = lambda q, k, v, seg: ops.attention_with_block_scores(q, k, v, segment_ids=seg, **kwargs)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)),
                         out_specs=(q_spec, scores_spec), check_vma=False)(q, k, v, segment_ids)
