"""Block-sparse ops on a device mesh: each kernel runs once per shard under `jax.shard_map`.

GSPMD cannot see inside a Pallas call, so left to itself it would gather q/k/v onto every device.
Attention is independent per batch row and per GQA group, so each device can run the kernel on its
own rows and heads: batch split over the data-parallel axes, heads over "tensor" (query and kv heads
split the same number of ways, so each query head stays with its kv head). Sparse methods call the
kernels through `block_sparse_attention`, `selected_key_attention`, `block_attention_scores` and
`attention_with_block_scores` here.

With a "context" mesh axis, sequences are split along T too. Methods work in natural order (see
sparsetrain/attention/context_parallel.py): these functions take and return natural order, move the
query rows to the load-balanced layout for the kernel, and each shard exchanges the keys it needs.
Dense layers, which stay in the layout, run `causal_attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from sparsetrain import ops
from sparsetrain.attention import context_parallel as cp
from sparsetrain.attention.ring import ring_attention
from sparsetrain.partitioning import logical_to_spec


def _active_mesh():
    """The mesh to split over, or None when there is nothing to split."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or all(size == 1 for size in mesh.shape.values()) else mesh


def _sequence_axis(mesh) -> str | None:
    """The mesh axis that splits T, or None."""
    return cp.AXIS if dict(mesh.shape).get(cp.AXIS, 1) > 1 else None


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


def _per_shard(q, k, v, block_mask, segment_ids, mesh, seq: str | None, kv_order: str = "natural",
               key_bias=None, **kwargs):
    """The kernel under shard_map; with T split over `seq`, the context-parallel body (q and
    segment ids in the load-balanced layout, k/v in `kv_order`, a tile mask in natural order, a
    token selection's rows in the layout). block_mask: a bool tile mask or a `Selection` (tile
    selections run as their mask); key_bias [B, K, S] or None, split like k (S in `kv_order`)."""
    if seq is not None and kwargs.get("return_skipped"):
        raise NotImplementedError("skip_threshold (BLASST) under mesh.context > 1 is not supported yet; "
                                  "use mesh.context=1")
    token = isinstance(block_mask, ops.Selection) and block_mask.granularity == "token"
    if isinstance(block_mask, ops.Selection) and not token:
        block_mask = block_mask.to_mask()
    heads = block_mask.indices.shape[1] if token else block_mask.shape[1]
    q_spec, kv_spec, mask_spec = _specs(q, k, heads, mesh, seq)
    if token:   # rows split like q's batch, heads and tokens; extras are the method's, not the kernel's
        block_mask = dataclasses.replace(block_mask, extras={})
        rows = P(mask_spec[0], mask_spec[1], seq)
        mask_spec = dataclasses.replace(block_mask, indices=P(*rows, None), counts=rows)
    out_specs = [q_spec]
    if kwargs.get("return_lse"):   # lse [B, N, T]: batch, heads, sequence
        out_specs.append(P(q_spec[0], q_spec[2], q_spec[1]))
    if kwargs.get("return_skipped"):   # BLASST's skipped tiles [B, N, nQ, nK]: batch, heads
        out_specs.append(P(q_spec[0], q_spec[2], None, None))
    out_spec = tuple(out_specs) if len(out_specs) > 1 else q_spec
    if seq is None:
        kernel = lambda q, k, v, mask, seg, bias: ops.block_sparse_attention(q, k, v, mask, segment_ids=seg,
                                                                             key_bias=bias, **kwargs)
    else:
        body = ring_attention if cp.current_kv_exchange() == "ring" else cp.shard_attention
        kernel = lambda q, k, v, mask, seg, bias: body(q, k, v, mask, seg, kv_order=kv_order, key_bias=bias,
                                                       **kwargs)
    # check_vma=False: the Pallas call has no varying-across-mesh typing rule. Segment ids [B, T]
    # split like q's batch and sequence (None is an empty operand), the key bias like k.
    bias_spec = P(kv_spec[0], kv_spec[2], kv_spec[1])
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, mask_spec, P(q_spec[0], seq), bias_spec),
                         out_specs=out_spec, check_vma=False)(q, k, v, block_mask, segment_ids, key_bias)


def _rows_to_layout(block_mask):
    """A token selection's rows (axis 2) in the load-balanced layout; tile masks stay natural."""
    if isinstance(block_mask, ops.Selection) and block_mask.granularity == "token":
        return dataclasses.replace(block_mask, indices=cp.to_load_balanced(block_mask.indices, axis=2),
                                   counts=cp.to_load_balanced(block_mask.counts, axis=2))
    return block_mask


def _rows_to_natural(result, axes: tuple[int, ...]):
    """A kernel's result (an array, or a tuple of them) with each array's token rows, on the matching
    entry of `axes`, back in natural order."""
    if isinstance(result, tuple):
        return tuple(cp.to_natural(r, axis=axis) for r, axis in zip(result, axes))
    return cp.to_natural(result, axis=axes[0])


def block_sparse_attention(q, k, v, block_mask, *, segment_ids=None, split_sequence=True, **kwargs):
    """`sparsetrain.ops.block_sparse_attention` (same arguments and result), run per shard when a
    mesh is active and directly otherwise. Under a context split every array is in natural order
    (as the method sees it); each device runs its load-balanced query chunks. `split_sequence=False`
    for attention whose rows are not the layer's tokens (NSA's compressed tokens): T then stays
    whole on every context device. A sliding `window` counts in natural positions on every path."""
    mesh = _active_mesh()
    if mesh is None:
        return ops.block_sparse_attention(q, k, v, block_mask, segment_ids=segment_ids, **kwargs)
    seq = _sequence_axis(mesh) if split_sequence else None
    if seq is None:
        return _per_shard(q, k, v, block_mask, segment_ids, mesh, None, **kwargs)
    result = _per_shard(cp.to_load_balanced(q), k, v, _rows_to_layout(block_mask),
                        cp.to_load_balanced(segment_ids), mesh, seq, **kwargs)
    return _rows_to_natural(result, (1, 2))   # o [B, T, N, H], lse [B, N, T]


def selected_key_attention(q, k, v, indices, **kwargs):
    """`sparsetrain.ops.selected_key_attention` (DSA: one key list per token, shared by its heads;
    same arguments and result), run per shard when a mesh is active: batch and heads split as for
    `block_sparse_attention`, and under a context split each device runs its load-balanced query
    rows over the gathered K/V (`context_parallel.shard_selected_keys`). Natural order in and out."""
    mesh = _active_mesh()
    if mesh is None:
        return ops.selected_key_attention(q, k, v, indices, **kwargs)
    seq = _sequence_axis(mesh)
    q_spec, kv_spec, _ = _specs(q, k, q.shape[2], mesh, seq)
    out_spec = (q_spec, P(q_spec[0], q_spec[2], seq)) if kwargs.get("return_lse") else q_spec   # o, lse [B, N, T]
    body = ops.selected_key_attention if seq is None else cp.shard_selected_keys
    run = jax.shard_map(functools.partial(body, **kwargs), in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], seq)),
                        out_specs=out_spec, check_vma=False)
    if seq is None:
        return run(q, k, v, indices)
    return _rows_to_natural(run(cp.to_load_balanced(q), k, v, cp.to_load_balanced(indices)), (1, 2))


def causal_attention(q, k, v, *, segment_ids=None, impl: str = "auto", layout: str = "load_balanced"):
    """Dense causal attention (within documents when `segment_ids` are given) on a context-split
    mesh: the block-sparse kernel over every causal tile, which is exact and skips the tiles above
    the diagonal. q/k/v and segment ids in the load-balanced `layout` (dense layers) or "natural"
    (a method's dense branch); the result in the same order. Shapes as `ops.block_sparse_attention`."""
    mesh = _active_mesh()
    block_size = cp.dense_block_size(q.shape[1], cp.context_size())
    tiles = cp.causal_tiles(q.shape[1], k.shape[2], q.shape[0], block_size)
    if layout == "natural":
        return block_sparse_attention(q, k, v, tiles, segment_ids=segment_ids, block_size=block_size, impl=impl)
    return _per_shard(q, k, v, tiles, segment_ids, mesh, _sequence_axis(mesh), kv_order="load_balanced",
                      block_size=block_size, impl=impl)


def _dense_map(op, q, k, v, segment_ids, **kwargs):
    """`op` (`ops.block_attention_scores`, v None, or `ops.attention_with_block_scores`) per shard;
    under a context split each device scores its load-balanced query rows over all keys. Natural
    order in and out."""
    mesh = _active_mesh()
    if mesh is None:
        args = (q, k) if v is None else (q, k, v)
        return op(*args, segment_ids=segment_ids, **kwargs)
    seq = _sequence_axis(mesh)
    q_spec, kv_spec, scores_spec = _specs(q, k, q.shape[2], mesh, seq)
    scores_spec = P(scores_spec[0], scores_spec[1], seq, None)
    out_specs = scores_spec if v is None else (q_spec, scores_spec)
    if seq is None:
        kernel = lambda q, k, v, seg: op(*((q, k) if v is None else (q, k, v)), segment_ids=seg, **kwargs)
        return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)), out_specs=out_specs,
                             check_vma=False)(q, k, v, segment_ids)
    kernel = functools.partial(cp.shard_block_scores, op, **kwargs)
    result = jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], seq)), out_specs=out_specs,
                           check_vma=False)(cp.to_load_balanced(q), k, v, cp.to_load_balanced(segment_ids))
    return _rows_to_natural(result, (2,) if v is None else (1, 2))   # scores [B, N, nQ, nK], o [B, T, N, H]


def block_attention_scores(q, k, *, segment_ids=None, **kwargs):
    """`sparsetrain.ops.block_attention_scores`, run per shard when a mesh is active (natural order
    in and out under a context split; each device scores its own query rows)."""
    return _dense_map(ops.block_attention_scores, q, k, None, segment_ids, **kwargs)


def attention_with_block_scores(q, k, v, *, segment_ids=None, **kwargs):
    """`sparsetrain.ops.attention_with_block_scores` (dense attention and its block scores), run
    per shard as `block_attention_scores`."""
    return _dense_map(ops.attention_with_block_scores, q, k, v, segment_ids, **kwargs)
