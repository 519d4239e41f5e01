"""Context parallelism: each sequence split along T over the mesh's "context" axis.

Layout. With n context devices a sequence is cut into 2n chunks of c = T / 2n tokens; device d holds
chunks d and 2n-1-d (one early, one late), so every device has the same causal work. The train step
permutes the whole batch (tokens, targets, positions, masks) into this order before the model runs
(`to_load_balanced`): positions travel with their tokens, so RoPE stays right, and the loss is a sum
over tokens, so it does not care about the order. Only attention looks across tokens.

Methods see natural order. A sparse method's selection reads positions, blocks and documents of the
whole sequence, so the layer hands it its inputs put back in natural order (`to_natural`: a fixed
permutation of chunks between devices, T stays split) and the output back in the layout order; the
method's selection code is the one-device code, partitioned along T by XLA. Only the kernels split by
chunk: `sparsetrain.attention.sharded` moves the query rows (and a token selection's rows) to the
load-balanced order, and each device runs its two query chunks here. Dense layers skip the round
trip: they select nothing.

Attention per device (the body of a shard_map). The device's K and V are exchanged over the context
axis (`KV_EXCHANGES`):
  * "all_gather" (as MaxText): every device gathers all of K and V once, in natural order. Each query
    chunk then runs the block-sparse kernel over the keys at or before it. Shapes must be static, so
    instead of slicing a chunk's prefix of keys, the keys are rolled so that the prefix ends exactly
    where the chunk ends: the kernel's end-aligned causal mask then equals the natural one, and the
    key blocks rolled in from the future are excluded by the (rolled) selection, which is causal.
    The roll keeps every query-key distance, so a sliding `window` holds unchanged. The gather's
    transpose is a reduce-scatter, so gradients flow back to the K/V shards.
  * "ring" (ppermute): K/V travel around the ring one device's shard (two chunks) at a time; each
    device attends its query chunks to the visiting chunks and merges the partial results by their
    log-sum-exp. It holds 2 chunks of K/V instead of 2n, at n - 1 exchanges per layer (and again in
    the backward pass, whose ppermutes JAX derives).
Tile selections are block masks in natural order; token selections are lists of global key blocks,
shifted by the roll (their entries are causal, so none wraps). Neither the selection nor this layer
depends on the kernel's loop order. A per-key logit bias (`key_bias` [B, K, S]: DMA's and NOSA's
key scores) is exchanged with its keys, so its gradient returns to its shard as K/V's do. DSA's
lists of single keys (`shard_selected_keys`) need no roll: they name global positions, and the
device's rows run over the gathered K/V.

Axis legend: B batch, T sequence, N query heads, K kv heads, H head dim, bs block size.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparsetrain import ops

AXIS = "context"
KV_EXCHANGES = ("all_gather", "ring")
_KV_EXCHANGE = contextvars.ContextVar("kv_exchange", default="all_gather")


def context_size() -> int:
    """Devices each sequence is split over in the current mesh (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def current_kv_exchange() -> str:
    """The K/V exchange set by the innermost `kv_exchange` block ("all_gather" outside any)."""
    return _KV_EXCHANGE.get()


@contextlib.contextmanager
def kv_exchange(mode: str):
    """How K/V travel between context devices while tracing inside this block (`KV_EXCHANGES`);
    set by the trainer from `mesh.kv_exchange`, like the mesh itself it is ambient."""
    if mode not in KV_EXCHANGES:
        raise ValueError(f"kv_exchange={mode!r}; choose one of {KV_EXCHANGES}")
    token = _KV_EXCHANGE.set(mode)
    try:
        yield
    finally:
        _KV_EXCHANGE.reset(token)


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


def _natural_chunk(n: int, device, slot: int):
    """The chunk that `slot` (0, 1) of `device` holds in natural order (device d: chunks 2d, 2d+1)."""
    return 2 * device + slot


def _balanced_chunk(n: int, device, slot: int):
    """The chunk that `slot` of `device` holds in the load-balanced layout (chunks d and 2n-1-d)."""
    return device if slot == 0 else 2 * n - 1 - device


def _move_chunks(x: jax.Array | None, axis: int, source, target) -> jax.Array | None:
    """x with its per-token `axis` re-laid from the chunk layout `source` to `target` (functions
    (n, device, slot) -> chunk). Under a context split each device sends its two chunks straight
    to their new devices (collective permutes: 2/n of the array leaves each device), where a
    gather by index would make XLA all-gather the whole sequence onto every device first."""
    n = context_size()
    if n == 1 or x is None:
        return x
    chunk_length(x.shape[axis], n)   # ValueError unless 2n whole chunks

    def body(local):
        slots = jnp.split(local, 2, axis=axis)
        out = []
        for t in range(2):
            received = []
            for s in range(2):
                where = {source(n, d, s): d for d in range(n)}     # chunk -> device holding it in slot s
                pairs = [(where[target(n, e, t)], e) for e in range(n) if target(n, e, t) in where]
                if pairs:
                    received.append(jax.lax.ppermute(slots[s], AXIS, pairs))
            out.append(sum(received[1:], received[0]))
        return jnp.concatenate(out, axis=axis)

    spec = jax.sharding.PartitionSpec(*([None] * axis), AXIS)
    return jax.shard_map(body, in_specs=spec, out_specs=spec, axis_names=frozenset({AXIS}), check_vma=False)(x)


def to_load_balanced(x: jax.Array | None, axis: int = 1) -> jax.Array | None:
    """An array with T (or any per-token rows) on `axis`, split over the context devices, in the
    load-balanced layout of the current mesh (unchanged without a context split; None stays None)."""
    return _move_chunks(x, axis, _natural_chunk, _balanced_chunk)


def to_natural(x: jax.Array | None, axis: int = 1) -> jax.Array | None:
    """The inverse of `to_load_balanced`."""
    return _move_chunks(x, axis, _balanced_chunk, _natural_chunk)


def causal_tiles(seq_len: int, num_kv_heads: int, batch: int, block_size: int) -> jax.Array:
    """bool [B, K, nQ, nK]: every causal tile in natural order (dense attention as a block mask)."""
    tiles = ops.causal_block_mask(seq_len, seq_len, block_size)
    return jnp.broadcast_to(tiles, (batch, num_kv_heads, *tiles.shape))


def dense_block_size(seq_len: int, num_devices: int) -> int:
    """The kernel tile for dense attention: the largest of 64, 32, 16 that divides a chunk."""
    c = chunk_length(seq_len, num_devices)
    for bs in (64, 32, 16):
        if c % bs == 0:
            return bs
    raise ValueError(f"mesh.context={num_devices}: chunks of data.seq_len / {2 * num_devices} = {c} tokens; "
                     "dense attention needs them to be a multiple of 16 (the kernel's smallest tile)")


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """One of the device's two query chunks: its rows in the device's slice, its index in natural
    order, and the roll that puts the keys up to its end at the end of the sequence."""

    rows: slice
    index: jax.Array
    shift: jax.Array     # tokens

    @staticmethod
    def of_device(c: int) -> tuple["_Chunk", "_Chunk"]:
        n, d = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
        chunks = (d, 2 * n - 1 - d)
        return tuple(_Chunk(slice(s * c, (s + 1) * c), chunk, 2 * n * c - (chunk + 1) * c)
                     for s, chunk in enumerate(chunks))


def gather_natural(x: jax.Array | None, layout: str, axis: int = 1) -> jax.Array | None:
    """The whole sequence in natural order (T on `axis`, e.g. [B, T, ...]) from each device's slice of
    2c tokens there, whose `layout` is "natural" (contiguous) or "load_balanced"; None stays None."""
    if x is None:
        return None
    full = jax.lax.all_gather(x, AXIS, axis=axis, tiled=True)
    if layout == "natural":
        return full
    return jnp.take(full, np.argsort(load_balanced_order(full.shape[axis], jax.lax.axis_size(AXIS))), axis=axis)


def _chunk_rows(block_mask, chunk: _Chunk, c: int, block_size: int):
    """The chunk's rows of a selection, in the rolled key coordinates: a tile mask [B, ., nQ, nK] in
    natural order (rows sliced, columns rolled), or a token `Selection` whose rows are the device's
    (entries shifted; -1 padding stays)."""
    shift = chunk.shift // block_size
    if isinstance(block_mask, ops.Selection):
        indices = block_mask.indices[:, :, chunk.rows]
        indices = jnp.where(indices >= 0, indices + shift, indices)
        return ops.Selection(indices, block_mask.counts[:, :, chunk.rows], block_mask.num_blocks, {}, "token")
    tiles = jax.lax.dynamic_slice_in_dim(block_mask, chunk.index * (c // block_size), c // block_size, axis=2)
    tiles = jnp.roll(tiles, shift, axis=3)                                     # [B, ., c/bs, nK]
    # The blocks rolled in from after the chunk: a causal selection already excludes them; this
    # keeps the result exact for any other mask too.
    return tiles & (jnp.arange(tiles.shape[3]) >= shift)


def check_chunks(q: jax.Array, block_size: int) -> int:
    """c, the tokens of each of the device's two query chunks q [B, 2c, ...]; ValueError unless whole
    kernel tiles."""
    c = q.shape[1] // 2
    if c % block_size:
        n = jax.lax.axis_size(AXIS)
        raise ValueError(f"mesh.context={n}: chunks of {c} tokens are not a multiple of "
                         f"block_size={block_size}; make data.seq_len a multiple of {2 * n * block_size}")
    return c


def shard_attention(q, k, v, block_mask, segment_ids, *, block_size: int, kv_order: str = "natural",
                    causal: bool = True, return_lse: bool = False, key_bias=None, **kwargs):
    """One device's block-sparse attention under context parallelism (the body of a shard_map
    over the mesh; batch and heads may be split too).

    q: [B, 2c, N, H] this device's two query chunks in layout order; k, v: [B, 2c, K, H] this
    device's slice of the keys, in natural order (`kv_order="natural"`) or in the layout;
    block_mask: bool [B, K or N, nQ, nK] over the whole sequence in natural order, or a token
    `Selection` of the device's rows (global key blocks); segment_ids: [B, 2c] (q's rows) or None;
    key_bias: [B, K, 2c] the device's slice of a per-key logit bias, in k's order, or None (gathered
    and rolled with the keys: its gradient flows back to the slice as K/V's do).
    kwargs: as `sparsetrain.ops.block_sparse_attention`. Returns [B, 2c, N, H] (and with return_lse
    f32 [B, N, 2c]).
    """
    if not causal:
        raise NotImplementedError("context parallelism runs causal attention only")
    c = check_chunks(q, block_size)
    k_all, v_all = gather_natural(k, kv_order), gather_natural(v, kv_order)   # [B, T, K, H]
    bias_all = gather_natural(key_bias, kv_order, axis=2)                      # [B, K, T] or None
    seg_all = gather_natural(segment_ids, "load_balanced")                    # [B, T] or None
    outs = []
    for chunk in _Chunk.of_device(c):
        roll = lambda x, axis=1: None if x is None else jnp.roll(x, chunk.shift, axis=axis)   # noqa: E731
        segments = None if seg_all is None else ops.SegmentIds(q=segment_ids[:, chunk.rows], kv=roll(seg_all))
        outs.append(ops.block_sparse_attention(q[:, chunk.rows], roll(k_all), roll(v_all),
                                               _chunk_rows(block_mask, chunk, c, block_size), causal=True,
                                               block_size=block_size, segment_ids=segments,
                                               key_bias=roll(bias_all, axis=2), return_lse=return_lse, **kwargs))
    if return_lse:
        return jnp.concatenate([o for o, _ in outs], axis=1), jnp.concatenate([lse for _, lse in outs], axis=2)
    return jnp.concatenate(outs, axis=1)


def shard_selected_keys(q, k, v, indices, *, kv_order: str = "natural", **kwargs):
    """One device's attention over selected keys (DSA) under context parallelism: its query rows q
    [B, 2c, N, H] (any order) with their key lists int [B, 2c, m] of global positions in natural
    order, over the whole sequence's K/V gathered from the slices k, v [B, 2c, K, H] in `kv_order`.
    The lists are causal and name their keys, so no roll is needed. kwargs and result as
    `sparsetrain.ops.selected_key_attention`."""
    return ops.selected_key_attention(q, gather_natural(k, kv_order), gather_natural(v, kv_order), indices, **kwargs)


def shard_block_scores(op, q, k, v, segment_ids, *, block_size: int, causal: bool = True, **kwargs):
    """One device's rows of a dense-map op under context parallelism: `op` is
    `ops.block_attention_scores` (v None) or `ops.attention_with_block_scores`.

    q: [B, 2c, N, H] the device's query chunks in layout order; k, v: [B, 2c, K, H] its slice of
    the keys in natural order; segment_ids [B, 2c] (q's rows) or None. Returns op's results for
    the device's rows: scores f32 [B, N, 2c/bs, nK] (key blocks in natural order), and with v the
    output [B, 2c, N, H] first. The op takes no block mask, so the keys rolled in from after the
    chunk are hidden by segment ids (-1 matches no query).
    """
    if not causal:
        raise NotImplementedError("context parallelism runs causal attention only")
    c = check_chunks(q, block_size)
    k_all = gather_natural(k, "natural")
    v_all = gather_natural(v, "natural")   # None without v
    q_ids = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    kv_ids = jnp.zeros(k_all.shape[:2], jnp.int32) if segment_ids is None else gather_natural(segment_ids,
                                                                                               "load_balanced")
    outs, scores = [], []
    for chunk in _Chunk.of_device(c):
        roll = lambda x: jnp.roll(x, chunk.shift, axis=1)   # noqa: E731
        future = jnp.arange(k_all.shape[1]) < chunk.shift
        ids = ops.SegmentIds(q=q_ids[:, chunk.rows], kv=jnp.where(future, -1, roll(kv_ids)))
        args = (q[:, chunk.rows], roll(k_all)) + (() if v is None else (roll(v_all),))
        result = op(*args, causal=True, block_size=block_size, segment_ids=ids, **kwargs)
        out, s = (None, result) if v is None else result
        outs.append(out)
        scores.append(jnp.roll(s, -(chunk.shift // block_size), axis=3))     # key blocks back in natural order
    scores = jnp.concatenate(scores, axis=2)
    return scores if v is None else (jnp.concatenate(outs, axis=1), scores)
