"""Block-sparse ops on a device mesh: each kernel runs once per shard under `jax.shard_map`.

GSPMD cannot see inside a Pallas call, so left to itself it would gather q/k/v onto every device.
Attention is independent per batch row and per GQA group, so each device can run the kernel on its
own rows and heads: batch split over the data-parallel axes, heads over "tensor" (query and kv heads
split the same number of ways, so each query head stays with its kv head). Sparse methods call the
kernels through `block_sparse_attention` and `block_attention_scores` here.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from sparsetrain import ops
from sparsetrain.partitioning import logical_to_spec


def _active_mesh():
    """The mesh to split over, or None when there is nothing to split."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or all(size == 1 for size in mesh.shape.values()) else mesh


def _specs(q, k, heads_dim: int, mesh):
    """(q spec, k/v spec, spec of an array with heads on axis 1 of size `heads_dim`). Heads are
    split only if every head count allows it."""
    batch = logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    heads = logical_to_spec(("heads",), q.shape[2:3], mesh)[0]
    kv_heads = logical_to_spec(("kv_heads",), k.shape[2:3], mesh)[0]
    other = logical_to_spec(("heads",), (heads_dim,), mesh)[0]
    if heads is None or kv_heads is None or other is None:
        heads = kv_heads = other = None
    return P(batch, None, heads, None), P(batch, None, kv_heads, None), P(batch, other, None, None)


def block_sparse_attention(q, k, v, block_mask, **kwargs):
    """`sparsetrain.ops.block_sparse_attention` (same arguments and result), run per shard when a
    mesh is active and directly otherwise."""
    mesh = _active_mesh()
    if mesh is None:
        return ops.block_sparse_attention(q, k, v, block_mask, **kwargs)
    q_spec, kv_spec, mask_spec = _specs(q, k, block_mask.shape[1], mesh)
    kernel = functools.partial(ops.block_sparse_attention, **kwargs)
    # check_vma=False: the Pallas call has no varying-across-mesh typing rule.
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, block_mask)


def block_attention_scores(q, k, **kwargs):
    """`sparsetrain.ops.block_attention_scores`, run per shard when a mesh is active."""
    mesh = _active_mesh()
    if mesh is None:
        return ops.block_attention_scores(q, k, **kwargs)
    q_spec, kv_spec, out_spec = _specs(q, k, q.shape[2], mesh)
    kernel = functools.partial(ops.block_attention_scores, **kwargs)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec), out_specs=out_spec, check_vma=False)(q, k)
