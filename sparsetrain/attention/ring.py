"""Ring K/V exchange for context parallelism (`mesh.kv_exchange="ring"`): the body of a shard_map,
as `context_parallel.shard_attention`, that never holds more than one other device's K/V.

Each device starts with its own K/V slice (two chunks) and passes it to the next device n - 1 times;
at every step its two query chunks attend to the two visiting key chunks, and the partial results
merge by their log-sum-exp (flash attention's rescaling, across devices). A (query chunk, key chunk)
pair runs the block-sparse kernel over the key chunk written twice, [earlier | diagonal]: with the
queries end-aligned, the first copy is fully visible and the second causal, so the tiles of the
first copy are kept when the key chunk lies before the query chunk, those of the second when it is
the query chunk itself, and none when it lies after it. Static shapes, and no tile is computed twice.

A per-key logit bias (`key_bias` [B, K, S], DMA's and NOSA's learned key scores) travels with its
keys: the visiting slice is (K, V, bias), and the bias's gradient comes home with K/V's.

The backward pass is written by hand (`jax.custom_vjp`) so that it holds one visiting slice too: it
sends K/V (and the bias) around the ring again with their gradient accumulators, recomputes each
pair's forward and pulls the merged output's cotangent back through it; the accumulators then take
one more step home.
Autodiff of the forward loop would instead keep every visiting slice as a residual, the memory of
the all-gather.

A sliding `window` is not supported (NSA's window branch): the doubled key chunk puts every earlier
chunk at the same distance. Axis legend as in context_parallel.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparsetrain import ops
from sparsetrain.attention.context_parallel import AXIS, check_chunks, gather_natural


def _key_chunks(owner, n, kv_order: str):
    """Natural indices of the two chunks of device `owner`'s K/V slice."""
    if kv_order == "natural":
        return 2 * owner, 2 * owner + 1
    return owner, 2 * n - 1 - owner


def _pair_selection(block_mask, q_chunk, k_chunk, rows: slice, cb: int):
    """The selection of one (query chunk, key chunk) pair over the doubled key chunk (2 cb blocks):
    a tile mask [B, ., cb, 2cb] or token lists whose entries are renumbered into it."""
    earlier, diagonal = k_chunk < q_chunk, k_chunk == q_chunk
    if isinstance(block_mask, ops.Selection):
        indices, counts = block_mask.indices[:, :, rows], block_mask.counts[:, :, rows]
        m = indices.shape[-1]
        real = jnp.arange(m) < counts[..., None]
        # Entries are ascending, so those inside the key chunk are one run: move it to the front.
        start = jnp.sum(real & (indices < k_chunk * cb), -1)
        stop = jnp.sum(real & (indices < (k_chunk + 1) * cb), -1)
        run = jnp.take_along_axis(indices, jnp.minimum(jnp.arange(m) + start[..., None], m - 1), -1)
        count = jnp.where(earlier | diagonal, stop - start, 0)
        local = run - k_chunk * cb + jnp.where(diagonal, cb, 0)
        return ops.Selection(jnp.where(jnp.arange(m) < count[..., None], local, -1).astype(jnp.int32),
                             count.astype(jnp.int32), 2 * cb, {}, "token")
    tiles = jax.lax.dynamic_slice_in_dim(block_mask, q_chunk * cb, cb, axis=2)
    tiles = jax.lax.dynamic_slice_in_dim(tiles, k_chunk * cb, cb, axis=3)
    return jnp.concatenate([tiles & earlier, tiles & diagonal], axis=3)


def _merge(o_a, lse_a, o_b, lse_b):
    """Two partial attentions over disjoint keys as one: (o f32 [B, c, N, H], lse f32 [B, N, c])."""
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w_a, w_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
    total = w_a + w_b
    scale = lambda w: (w / jnp.where(total > 0, total, 1.0)).transpose(0, 2, 1)[..., None]  # noqa: E731
    return scale(w_a) * o_a + scale(w_b) * o_b, top + jnp.log(total)


def ring_attention(q, k, v, block_mask, segment_ids, *, block_size: int, kv_order: str = "natural",
                   causal: bool = True, return_lse: bool = False, window=None, key_bias=None, **kwargs):
    """Same arguments and result as `context_parallel.shard_attention`, K/V passed around the ring."""
    if not causal or window is not None:
        raise NotImplementedError("mesh.kv_exchange='ring' runs causal attention without a sliding window "
                                  "(NSA's window branch needs kv_exchange='all_gather')")
    c = check_chunks(q, block_size)
    seg_all = gather_natural(segment_ids, "load_balanced")   # [B, T] or None, small
    # Hashable (custom_vjp's static argument): the kernel's options, the layout and c.
    static = tuple(sorted(dict(block_size=block_size, kv_order=kv_order, c=c, **kwargs).items()))
    o, lse = _ring(q, (k, v, key_bias), block_mask, segment_ids, seg_all, static)
    return (o, lse) if return_lse else o


def _pairs(static):
    """The device's ring steps: for each, the four (query slot, its chunk, key slot, its chunk)
    pairs of its query chunks and the visiting slice's key chunks (natural chunk indices)."""
    n, d = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
    mine = (d, 2 * n - 1 - d)
    for step in range(n):
        owner = (d - step) % n
        keys = _key_chunks(owner, n, dict(static)["kv_order"])
        yield [(qs, mine[qs], ks, keys[ks]) for qs in range(2) for ks in range(2)]


def _attend_pair(q, kv, block_mask, segment_ids, seg_all, pair, static):
    """(o f32, lse) of one query chunk of q over one key chunk of the visiting slice kv = (k, v, key
    bias or None)."""
    static = dict(static)
    c, bs = static["c"], static["block_size"]
    qs, q_chunk, ks, k_chunk = pair
    rows, keys = slice(qs * c, (qs + 1) * c), slice(ks * c, (ks + 1) * c)
    k, v, bias = kv
    doubled = lambda x: jnp.concatenate([x[:, keys]] * 2, axis=1)   # noqa: E731
    bias = None if bias is None else jnp.concatenate([bias[:, :, keys]] * 2, axis=2)   # [B, K, 2c]
    segments = None
    if segment_ids is not None:
        kv_ids = jax.lax.dynamic_slice_in_dim(seg_all, k_chunk * c, c, axis=1)
        segments = ops.SegmentIds(q=segment_ids[:, rows], kv=jnp.concatenate([kv_ids] * 2, axis=1))
    kernel_kwargs = {key: val for key, val in static.items() if key not in ("kv_order", "c", "block_size")}
    o, lse = ops.block_sparse_attention(q[:, rows], doubled(k), doubled(v),
                                        _pair_selection(block_mask, q_chunk, k_chunk, rows, c // bs),
                                        causal=True, block_size=bs, segment_ids=segments, key_bias=bias,
                                        return_lse=True, **kernel_kwargs)
    return o.astype(jnp.float32), lse


def _next(xs):
    """The arrays (a pytree) of the previous device on the ring (each passes to the next one)."""
    n = jax.lax.axis_size(AXIS)
    return jax.lax.ppermute(xs, AXIS, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, kv, block_mask, segment_ids, seg_all, static):
    """(o [B, 2c, N, H], lse f32 [B, N, 2c]) of the device's query rows over all keys; kv = (k, v,
    key bias or None), the device's slice."""
    parts = [None, None]   # per query slot: (o, lse) merged so far
    steps = list(_pairs(static))
    for step, pairs in enumerate(steps):
        for pair in pairs:
            o, lse = _attend_pair(q, kv, block_mask, segment_ids, seg_all, pair, static)
            qs = pair[0]
            parts[qs] = (o, lse) if parts[qs] is None else _merge(*parts[qs], o, lse)
        if step < len(steps) - 1:
            kv = _next(kv)
    o = jnp.concatenate([p[0] for p in parts], axis=1).astype(q.dtype)
    return o, jnp.concatenate([p[1] for p in parts], axis=2)


def _ring_fwd(q, kv, block_mask, segment_ids, seg_all, static):
    o, lse = _ring(q, kv, block_mask, segment_ids, seg_all, static)
    return (o, lse), (q, kv, block_mask, segment_ids, seg_all, o, lse)


def _ring_bwd(static, residuals, cotangents):
    q, kv, block_mask, segment_ids, seg_all, o, lse = residuals
    do, dlse = cotangents
    c = dict(static)["c"]
    do32, o32 = do.astype(jnp.float32), o.astype(jnp.float32)
    dq = jnp.zeros(q.shape, jnp.float32)
    dkv = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), kv)   # None (no bias) stays None
    steps = list(_pairs(static))
    for step, pairs in enumerate(steps):
        for pair in pairs:
            rows = slice(pair[0] * c, (pair[0] + 1) * c)
            (o_i, lse_i), pull = jax.vjp(
                lambda q, kv: _attend_pair(q, kv, block_mask, segment_ids, seg_all, pair, static), q, kv)
            # o = sum_i w_i o_i with w_i = exp(lse_i - lse): d o_i = w_i do, d lse_i = w_i (do . (o_i - o) + dlse).
            w = jnp.exp(jnp.where(jnp.isfinite(lse_i), lse_i - lse[:, :, rows], -jnp.inf))      # [B, N, c]
            w_rows = w.transpose(0, 2, 1)[..., None]
            d_o = w_rows * do32[:, rows]
            d_lse = w * (jnp.sum(do32[:, rows] * (o_i - o32[:, rows]), -1).transpose(0, 2, 1) + dlse[:, :, rows])
            dq_i, dkv_i = pull((d_o, d_lse))
            dq, dkv = dq + dq_i, jax.tree.map(jnp.add, dkv, dkv_i)
        # The gradients travel with the slice they belong to; after the last step one more hop home.
        if step < len(steps) - 1:
            kv, dkv = _next((kv, dkv))
        else:
            dkv = _next(dkv)
    # The selection and the segment ids are integers: no cotangent.
    return dq.astype(q.dtype), jax.tree.map(lambda d, x: d.astype(x.dtype), dkv, kv), None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
