"""Block-sparse attention on a device mesh: the kernel runs once per shard under `jax.shard_map`.

GSPMD cannot see inside a Pallas call, so left to itself it would gather q/k/v onto every device.
Attention is independent per batch row and per GQA group, so each device can run the kernel on its
own rows and heads: batch split over the data-parallel axes, heads over "tensor" (query and kv heads
split the same number of ways, so each query head stays with its kv head). Every sparse method calls
the kernel through `block_sparse_attention` here.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from sparsetrain import ops
from sparsetrain.partitioning import logical_to_spec


def _specs(q, k, mask, mesh):
    """(q/out spec, k/v spec, mask spec). Heads are split only if both head counts allow it."""
    batch = logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    heads = logical_to_spec(("heads",), q.shape[2:3], mesh)[0]
    kv_heads = logical_to_spec(("kv_heads",), k.shape[2:3], mesh)[0]
    mask_heads = logical_to_spec(("heads",), mask.shape[1:2], mesh)[0]
    if heads is None or kv_heads is None or mask_heads is None:
        heads = kv_heads = mask_heads = None
    return P(batch, None, heads, None), P(batch, None, kv_heads, None), P(batch, mask_heads, None, None)


def block_sparse_attention(q, k, v, block_mask, **kwargs):
    """`sparsetrain.ops.block_sparse_attention` (same arguments and result), run per shard when a
    mesh is active and directly otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(size == 1 for size in mesh.shape.values()):
        return ops.block_sparse_attention(q, k, v, block_mask, **kwargs)
    q_spec, kv_spec, mask_spec = _specs(q, k, block_mask, mesh)
    kernel = functools.partial(ops.block_sparse_attention, **kwargs)
    # check_vma=False: the Pallas call has no varying-across-mesh typing rule.
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, block_mask)
