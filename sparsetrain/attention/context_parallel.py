"""Context parallelism: each sequence split along T over the mesh's "context" axis.

Layout. With n context devices a sequence is cut into 2n chunks of c = T / 2n tokens; device d holds
chunks d and 2n-1-d (one early, one late), so every device has the same causal work. The train step
permutes the whole batch (tokens, targets, positions, masks) into this order before the model runs
(`to_load_balanced`): positions travel with their tokens, so RoPE stays right, and the loss is a sum
over tokens, so it does not care about the order. Only attention looks across tokens.

Attention (all-gather K/V, as MaxText's context parallelism does). Per shard, K and V are gathered
over the context axis and put back in natural order, then each of the device's two query chunks
runs the block-sparse kernel over the keys at or before it. Shapes must be static, so instead of
slicing a chunk's prefix of keys, the keys are rolled so that the prefix ends exactly where the
chunk ends: the kernel's end-aligned causal mask then equals the natural one, and the key blocks
rolled in from the future are excluded by the (rolled) block mask, which is causal. The block mask
is given in natural order, so `local`'s fixed pattern (selection for local queries over global key
blocks) holds unchanged, and so are the segment ids a selection reads; dense layers pass every
causal tile. The roll keeps every query-key distance, so a sliding `window` holds unchanged too. The gather's transpose is a
reduce-scatter, so gradients flow back to the K/V shards.

Axis legend: B batch, T sequence, N query heads, K kv heads, H head dim, bs block size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsetrain import ops

AXIS = "context"


def context_size() -> int:
    """Devices each sequence is split over in the current mesh (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def chunk_length(seq_len: int, num_devices: int) -> int:
    """c: tokens per chunk, T / 2n."""
    if seq_len % (2 * num_devices):
        raise ValueError(f"mesh.context={num_devices} cuts each sequence into {2 * num_devices} chunks; "
                         f"data.seq_len={seq_len} must be a multiple of {2 * num_devices}")
    return seq_len // (2 * num_devices)


def load_balanced_order(seq_len: int, num_devices: int) -> np.ndarray:
    """int [T]: the natural index of the token at each position of the load-balanced layout
    (device d's slice holds chunks d and 2n-1-d, in that order)."""
    chunks = np.arange(seq_len).reshape(2 * num_devices, chunk_length(seq_len, num_devices))
    return np.concatenate([np.concatenate([chunks[d], chunks[-1 - d]]) for d in range(num_devices)])


def to_load_balanced(x: jax.Array | None) -> jax.Array | None:
    """A [B, T, ...] array in the load-balanced order of the current mesh (unchanged without a
    context split; None stays None)."""
    n = context_size()
    if n == 1 or x is None:
        return x
    return jnp.take(x, load_balanced_order(x.shape[1], n), axis=1)


def to_natural(x: jax.Array | None) -> jax.Array | None:
    """The inverse of `to_load_balanced`."""
    n = context_size()
    if n == 1 or x is None:
        return x
    return jnp.take(x, np.argsort(load_balanced_order(x.shape[1], n)), axis=1)


def causal_tiles(seq_len: int, num_kv_heads: int, batch: int, block_size: int) -> jax.Array:
    """bool [B, K, nQ, nK]: every causal tile in natural order (dense attention as a block mask)."""
    tiles = ops.causal_block_mask(seq_len, seq_len, block_size)
    return jnp.broadcast_to(tiles, (batch, num_kv_heads, *tiles.shape))


def dense_block_size(seq_len: int, num_devices: int) -> int:
    """The kernel tile for dense layers: the largest of 64, 32, 16 that divides a chunk."""
    c = chunk_length(seq_len, num_devices)
    for bs in (64, 32, 16):
        if c % bs == 0:
            return bs
    raise ValueError(f"mesh.context={num_devices}: chunks of data.seq_len / {2 * num_devices} = {c} tokens; "
                     "dense layers need them to be a multiple of 16 (the kernel's smallest tile)")


def shard_attention(q, k, v, block_mask, segment_ids, *, block_size: int, causal: bool = True, **kwargs):
    """One device's block-sparse attention under context parallelism (the body of a shard_map
    over the mesh; batch and heads may be split too).

    q: [B, 2c, N, H], k, v: [B, 2c, K, H] this device's two chunks in layout order; block_mask:
    bool [B, K or N, nQ, nK] over the whole sequence in natural order; segment_ids: [B, 2c] or
    None. kwargs: as `sparsetrain.ops.block_sparse_attention`. Returns [B, 2c, N, H].
    """
    if not causal or kwargs.get("return_lse"):
        raise NotImplementedError("context parallelism runs causal attention without return_lse only")
    n = jax.lax.axis_size(AXIS)
    d = jax.lax.axis_index(AXIS)
    c = q.shape[1] // 2
    seq_len = 2 * n * c
    if c % block_size:
        raise ValueError(f"mesh.context={n}: chunks of {c} tokens are not a multiple of "
                         f"block_size={block_size}; make data.seq_len a multiple of {2 * n * block_size}")
    natural = np.argsort(load_balanced_order(seq_len, n))
    gather = lambda x: jnp.take(jax.lax.all_gather(x, AXIS, axis=1, tiled=True), natural, axis=1)
    k_all, v_all = gather(k), gather(v)                                   # [B, T, K, H]
    seg_all = None if segment_ids is None else gather(segment_ids)        # [B, T]
    outs = []
    for slot, chunk in enumerate((d, 2 * n - 1 - d)):
        rows = slice(slot * c, (slot + 1) * c)
        # Roll so the keys up to the chunk's end sit at the end of the array (see module docstring).
        shift = seq_len - (chunk + 1) * c
        roll = lambda x: jnp.roll(x, shift, axis=1)
        tiles = jax.lax.dynamic_slice_in_dim(block_mask, chunk * (c // block_size), c // block_size, axis=2)
        tiles = jnp.roll(tiles, shift // block_size, axis=3)             # [B, ., c/bs, nK]
        # The blocks rolled in from after the chunk: a causal selection already excludes them;
        # this keeps the result exact for any other mask too.
        tiles &= jnp.arange(tiles.shape[3]) >= shift // block_size
        segments = None if seg_all is None else ops.SegmentIds(q=segment_ids[:, rows], kv=roll(seg_all))
        outs.append(ops.block_sparse_attention(q[:, rows], roll(k_all), roll(v_all), tiles, causal=True,
                                               block_size=block_size, segment_ids=segments, **kwargs))
    return jnp.concatenate(outs, axis=1)
