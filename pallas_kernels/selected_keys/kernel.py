"""Attention over individually selected keys (DSA), Pallas Triton; `reference.py` has the same
signature and is what the tests compare it with.

Layout (FlashMLA's sparse layout, for GQA): one program per (batch row, query token, KV head), its
tile's rows the G query heads of that KV head (padded to at least 16 rows, the MMA M-dimension):
all of them read the same keys, so each selected key row is loaded once for the tile. The program
walks its token's list in chunks of `CHUNK` keys, gathering their K and V rows by index (-1 entries
masked), with an online softmax in float32.

  forward  grid (B, T, K): o [B, T, K, R, H] (R padded rows) and the natural-log LSE [B, T, K, R].
  backward grid (B, T, K), one pass: recompute p from the LSE, dq of the tile in registers, and dk,
           dv scattered with float32 atomic adds into [B, S + CHUNK, K, H] (a key is listed by many
           tokens; within one list keys are distinct, and padding entries go to the CHUNK spare
           rows, so a program never adds twice to one row).

q is regrouped to [B, T, K, R, H] in XLA; k and v stay whole in memory (rows are gathered by
pointer). The list is padded to a power of two >= CHUNK with -1. Not yet run compiled on a GPU;
`ops.selected_key_attention(..., impl="pallas")` selects it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.block_sparse.launch import dot_precision
from pallas_kernels.selected_keys.reference import check_selected_keys

CHUNK = 64      # keys a loop step (the MMA N-dimension of the forward)
MIN_ROWS = 16   # the MMA M-dimension: a tile has at least this many rows


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _gather(ref, b, keys, head, dim):
    """Rows `keys` [C] of batch b and kv head `head` of a whole [B, S, K, H] ref: [C, H]."""
    return ref[b, keys, head, pl.ds(0, dim)]


def _forward_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, steps, dim):
    b, head = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]
    precision = dot_precision(q.dtype)

    def step(c, carry):
        acc, top, total = carry
        idx = idx_ref[pl.ds(c * CHUNK, CHUNK)]
        keys = jnp.maximum(idx, 0)
        s = pltr.dot(q, _gather(k_ref, b, keys, head, dim), trans_b=True, precision=precision) * scale
        s = jnp.where((idx >= 0)[None, :], s, -jnp.inf)
        new_top = jnp.maximum(top, s.max(-1))          # top starts finite: no -inf - -inf
        p = jnp.exp(s - new_top[:, None])
        correction = jnp.exp(top - new_top)
        v = _gather(v_ref, b, keys, head, dim)
        acc = acc * correction[:, None] + pltr.dot(p.astype(v.dtype), v, precision=precision)
        return acc, new_top, total * correction + p.sum(-1)

    rows = q.shape[0]
    acc, top, total = jax.lax.fori_loop(0, steps, step, (jnp.zeros((rows, dim), jnp.float32),
                                                         jnp.full((rows,), -1e30, jnp.float32),
                                                         jnp.zeros((rows,), jnp.float32)))
    seen = total > 0
    o_ref[...] = (acc / jnp.where(seen, total, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def _backward_kernel(idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, _dk0, _dv0, dq_ref, dk_ref,
                     dv_ref, *, scale, steps, dim, spare):
    b, head = pl.program_id(0), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)       # rows with no key: p = 0 below
    precision = dot_precision(q.dtype)

    def step(c, dq):
        idx = idx_ref[pl.ds(c * CHUNK, CHUNK)]
        ok = idx >= 0
        keys = jnp.maximum(idx, 0)
        k, v = _gather(k_ref, b, keys, head, dim), _gather(v_ref, b, keys, head, dim)
        s = pltr.dot(q, k, trans_b=True, precision=precision) * scale
        p = jnp.where(ok[None, :], jnp.exp(s - lse[:, None]), 0.0)                       # [R, C]
        ds = p * (pltr.dot(do, v, trans_b=True, precision=precision) - delta[:, None])
        dv = pltr.dot(p.astype(do.dtype).T, do, precision=precision)                     # [C, H]
        dk = pltr.dot(ds.astype(q.dtype).T, q, precision=precision) * scale
        # Padding entries add zeros to spare rows S + lane, distinct from each other and from the
        # list's keys (no mask: the interpreter's atomics take none, and add duplicate rows once).
        # Every index is a full [C, H] array (the interpreter's atomics take no mixed indexers).
        shape = (CHUNK, dim)
        target = jnp.where(ok, idx, spare + jnp.arange(CHUNK))
        rows = (jnp.full(shape, b), jnp.broadcast_to(target[:, None], shape), jnp.full(shape, head),
                jnp.broadcast_to(jnp.arange(dim)[None, :], shape))
        pltr.atomic_add(dv_ref, rows, jnp.where(ok[:, None], dv, 0.0))
        pltr.atomic_add(dk_ref, rows, jnp.where(ok[:, None], dk, 0.0))
        return dq + pltr.dot(ds.astype(k.dtype), k, precision=precision) * scale

    dq_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros(q.shape, jnp.float32))


def _prepare(q, k, indices):
    """(q regrouped [B, T, K, R, H] with zero rows, lists padded [B, T, m_pad], steps)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    rows = max(MIN_ROWS, _pow2(g))
    grouped = jnp.pad(q.reshape(b, t, kh, g, h), ((0, 0),) * 3 + ((0, rows - g), (0, 0)))
    width = max(CHUNK, _pow2(indices.shape[-1]))
    lists = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, width - indices.shape[-1])),
                    constant_values=-1)
    return grouped, lists, width // CHUNK


def _specs(rows, dim, width):
    tile = pl.BlockSpec((None, None, None, rows, dim), lambda b, t, h: (b, t, h, 0, 0))
    row_values = pl.BlockSpec((None, None, None, rows), lambda b, t, h: (b, t, h, 0))
    lists = pl.BlockSpec((None, None, width), lambda b, t, h: (b, t, 0))
    return tile, row_values, lists, pl.no_block_spec


def _forward(q, k, v, indices, scale, interpret):
    b, t, n, h = q.shape
    kh = k.shape[2]
    grouped, lists, steps = _prepare(q, k, indices)
    rows = grouped.shape[3]
    tile, row_values, list_spec, whole = _specs(rows, h, lists.shape[-1])
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, steps=steps, dim=h), grid=(b, t, kh),
        in_specs=[list_spec, tile, whole, whole], out_specs=[tile, row_values],
        out_shape=[jax.ShapeDtypeStruct(grouped.shape, q.dtype), jax.ShapeDtypeStruct(grouped.shape[:4], jnp.float32)],
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
        name="selected_keys_fwd")(lists, grouped, k, v)
    return o, lse


def _ungroup(x, n):
    """[B, T, K, R, ...] -> [B, T, N, ...] (the real rows)."""
    kh = x.shape[2]
    return x[:, :, :, :n // kh].reshape(*x.shape[:2], n, *x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, indices, scale, interpret):
    o, lse = _forward(q, k, v, indices, scale, interpret)
    return _ungroup(o, q.shape[2]), _ungroup(lse, q.shape[2])


def _attention_fwd(q, k, v, indices, scale, interpret):
    o, lse = _attention(q, k, v, indices, scale, interpret)
    return (o, lse), (q, k, v, indices, o, lse)


def _attention_bwd(scale, interpret, residuals, cotangents):
    q, k, v, indices, o, lse = residuals
    do, dlse = cotangents
    b, t, n, h = q.shape
    kh = k.shape[2]
    # d lse / d s = p: an LSE cotangent enters ds as p * dlse, i.e. through delta.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1) - dlse
    grouped, lists, steps = _prepare(q, k, indices)
    rows = grouped.shape[3]
    regroup = lambda x: jnp.pad(x.reshape(b, t, kh, n // kh, *x.shape[3:]),   # noqa: E731
                                ((0, 0),) * 3 + ((0, rows - n // kh),) + ((0, 0),) * (x.ndim - 3))
    tile, row_values, list_spec, whole = _specs(rows, h, lists.shape[-1])
    # dk/dv accumulate in [B, S + CHUNK, K, H]: the last CHUNK rows take the padding entries' zeros.
    s = k.shape[1]
    acc_shape = (b, s + CHUNK, kh, h)
    zeros = jnp.zeros(acc_shape, jnp.float32)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_backward_kernel, scale=scale, steps=steps, dim=h, spare=s), grid=(b, t, kh),
        in_specs=[list_spec, tile, whole, whole, tile, row_values, row_values, whole, whole],
        out_specs=[tile, whole, whole],
        out_shape=[jax.ShapeDtypeStruct(grouped.shape, jnp.float32), jax.ShapeDtypeStruct(acc_shape, jnp.float32),
                   jax.ShapeDtypeStruct(acc_shape, jnp.float32)],
        input_output_aliases={7: 1, 8: 2}, compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="selected_keys_bwd")(
            lists, grouped, k, v, regroup(do.astype(q.dtype)), regroup(lse), regroup(delta), zeros, zeros)
    return (_ungroup(dq, n).astype(q.dtype), dk[:, :s].astype(k.dtype), dv[:, :s].astype(v.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def selected_key_attention(q, k, v, indices, *, sm_scale: float | None = None, query_chunk: int = 256,
                           return_lse: bool = False, interpret: bool = False):
    """Same arguments and result as `reference.selected_key_attention` (query_chunk is unused: the
    grid runs one query token a program)."""
    check_selected_keys(q, k, v, indices)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    o, lse = _attention(q, k, v, indices, scale, interpret)
    return (o, lse.swapaxes(1, 2)) if return_lse else o
