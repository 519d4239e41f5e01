"""Sliding window (`window=`): the tile and token Triton kernels vs the reference (outputs, LSE,
gradients), the reference vs an explicit-mask softmax, the tile classes and `window_block_mask`
vs brute force, the context-parallel roll, and bad inputs. Interpret mode on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_sparse import common, kernel, reference
from pallas_kernels.block_sparse_tpu import kernel as tpu
from sparsetrain import ops
from sparsetrain.attention import context_parallel
from tests.ops.helpers import seeded_rng
from tests.ops.test_block_sparse_attention import Case, check_against_reference, make_inputs, naive_attention
from tests.ops.test_segment_ids import segment_inputs
from tests.ops.test_token_selection import make_token_inputs, token_naive


def visible_keys(rng, c: Case, window: int, docs: bool):
    """(segment ids or None, bool [B, T, S] for the naive baseline: key s in the window of the
    query at (end-aligned) position p, p - window < s, and with docs in its document)."""
    s = c.seq_kv or c.seq
    pos = np.arange(c.seq)[:, None] + s - c.seq
    keys = jnp.asarray(np.arange(s)[None, :] > pos - window)[None]
    if not docs:
        return None, keys
    seg, same_doc = segment_inputs(rng, c, "packed")
    return seg, same_doc & keys


CASES = [  # (case, window, segment ids, None = a tile mask or the max blocks per token of a token Selection)
    (Case(100, block=32, head_dim=32, q_heads=4, kv_heads=1, mask="all", lse=True), 45, False, None),  # GQA 4:1
    (Case(40, seq_kv=90, block=16, head_dim=32, q_heads=4, kv_heads=2, lse=True), 5, False, None),  # S > T, w < bs
    (Case(80, block=16, head_dim=32, q_heads=2, kv_heads=1, mask="empty_rows", per_q_head=True, lse=True), 37,
     True, None),
    (Case(40, seq_kv=70, block=16, head_dim=32, q_heads=4, kv_heads=1, lse=True), 21, True, 3),  # query order
    (Case(40, block=16, head_dim=32, q_heads=6, kv_heads=2), 21, True, 3),  # G=3: key-block-outer order
]


@pytest.mark.parametrize("c, window, docs, max_blocks", CASES, ids=lambda x: str(x))
def test_kernel_matches_reference(c: Case, window: int, docs: bool, max_blocks: int | None, request):
    """Outputs, LSE and gradients of the tile kernel (token kernel for a token Selection)."""
    rng = seeded_rng(request)
    q, k, v, mask = make_inputs(rng, c) if max_blocks is None else make_token_inputs(rng, c, max_blocks)
    seg, keys = visible_keys(rng, c, window, docs)
    if max_blocks is None:
        naive = lambda *a: naive_attention(*a, mask, c, c.head_dim ** -0.5, keys)  # noqa: E731
    else:
        naive = token_naive(mask, c, keys)
    kw = dict(block_size=c.block, return_lse=True, segment_ids=seg, window=window)
    check_against_reference(
        c, rng, q, k, v,
        lambda *a: kernel.block_sparse_attention(*a, mask, interpret=True, **kw),
        # Jitted: one compile each instead of op-by-op dispatch keeps the test fast.
        jax.jit(lambda *a: reference.block_sparse_attention(*a, mask, **kw)), jax.jit(naive))


def test_window_covering_every_key_is_no_window(request):
    """window >= S hides nothing: the kernel and the reference give exactly what window=None gives,
    while one key fewer is a real window (the last row loses key 0)."""
    rng = seeded_rng(request)
    c = Case(50, block=16, head_dim=32, q_heads=2, kv_heads=1)
    q, k, v, mask = make_inputs(rng, c)
    mask = mask.at[..., -1, 0].set(True)
    run = lambda fn, window, **kw: fn(q, k, v, mask, block_size=16, window=window, return_lse=True, **kw)  # noqa: E731
    for got, want in zip(run(kernel.block_sparse_attention, c.seq, interpret=True),
                         run(kernel.block_sparse_attention, None, interpret=True)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    want = run(reference.block_sparse_attention, None)[0]
    np.testing.assert_array_equal(np.asarray(run(reference.block_sparse_attention, 10 * c.seq)[0]), np.asarray(want))
    assert not np.array_equal(np.asarray(run(reference.block_sparse_attention, c.seq - 1)[0][0, -1]),
                              np.asarray(want[0, -1]))


def test_reference_matches_explicit_masked_softmax(request):
    """The reference against softmax over an explicit [T, S] mask built position by position
    (float32): GQA, S > T, packed documents, empty rows."""
    rng = seeded_rng(request)
    c = Case(60, seq_kv=100, block=16, head_dim=32, q_heads=4, kv_heads=2, mask="empty_rows")
    window = 23
    q, k, v, mask = make_inputs(rng, c)
    seg, _ = segment_inputs(rng, c, "packed")
    o, lse = jax.jit(lambda *a: reference.block_sparse_attention(*a, mask, block_size=16, segment_ids=seg,
                                                                 window=window, return_lse=True))(q, k, v)
    pos = np.arange(c.seq)[:, None] + 40                        # end-aligned query positions
    key = np.arange(100)[None, :]
    blocks = np.asarray(mask)[0][:, np.arange(c.seq) // 16][:, :, key[0] // 16]   # [K, T, S]
    same_doc = np.asarray(seg.q)[0][:, None] == np.asarray(seg.kv)[0][None, :]
    keys = (pos - window < key) & (key <= pos) & same_doc & np.repeat(blocks, 2, axis=0)  # [N, T, S]
    kr, vr = (jnp.repeat(x[0], 2, axis=1) for x in (k, v))                             # [S, N, D]
    logits = jnp.where(keys, jnp.einsum("tnd,snd->nts", q[0], kr, precision="highest") / np.sqrt(32), -jnp.inf)
    rows = keys.any(-1)
    want_o = jnp.einsum("nts,snd->tnd", jax.nn.softmax(jnp.where(rows[..., None], logits, 0.0)) * rows[..., None],
                        vr, precision="highest")
    np.testing.assert_allclose(np.asarray(o[0]), np.asarray(want_o), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse[0]), np.asarray(jax.nn.logsumexp(logits, axis=-1)),
                               rtol=1e-5, atol=1e-6)   # atol: rows whose lse is near 0
    assert (~rows).any() and rows.any()   # the case has empty rows (o = 0, lse = -inf) and others


@pytest.mark.parametrize("seq_q, seq_kv, block, window", [
    (64, 64, 16, 16), (70, 70, 16, 5), (70, 150, 32, 40), (100, 100, 32, 1), (130, 130, 16, 37)])
def test_tile_classes_and_band_match_brute_force(seq_q, seq_kv, block, window):
    """possible = some (real query, key) pair visible; full = every key real and visible to every
    real row; `window_block_mask` is `possible`."""
    dims = common.Dims(1, seq_q, seq_kv, 1, 1, 1, 1, block)
    possible, full = common.tile_classes(dims, True, window)
    n_q, n_k = dims.n_q, dims.n_k
    seen = np.zeros((n_q * block, n_k * block), bool)
    seen[:seq_q, :seq_kv] = common.causal_element_mask(seq_q, seq_kv, True, window)
    real = np.zeros_like(seen)
    real[:seq_q] = True
    tiles = lambda x: x.reshape(n_q, block, n_k, block).swapaxes(1, 2).reshape(n_q, n_k, -1)  # noqa: E731
    np.testing.assert_array_equal(possible, tiles(seen).any(-1))
    np.testing.assert_array_equal(full, (tiles(seen) | ~tiles(real)).all(-1))
    np.testing.assert_array_equal(np.asarray(ops.window_block_mask(seq_q, seq_kv, block, window)), possible)
    np.testing.assert_array_equal(np.asarray(ops.window_block_mask(seq_q, seq_kv, block, seq_kv)),
                                  np.asarray(ops.causal_block_mask(seq_q, seq_kv, block)))


def test_context_parallel_roll_keeps_the_window(request):
    """`shard_attention` rolls each query chunk's keys; on a 1-device context mesh (two chunks)
    the window must still count in natural positions."""
    rng = seeded_rng(request)
    c = Case(64, block=16, head_dim=32, q_heads=2, kv_heads=1, mask="all")
    q, k, v, mask = make_inputs(rng, c)
    kw = dict(block_size=16, window=20, impl="xla")
    split = P(None, context_parallel.AXIS)
    run = jax.shard_map(lambda q, k, v: context_parallel.shard_attention(q, k, v, mask, None, **kw),
                        in_specs=(split, split, split), out_specs=split, check_vma=False)
    with jax.set_mesh(jax.make_mesh((1,), (context_parallel.AXIS,), axis_types=(AxisType.Auto,))):
        got = jax.jit(run)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ops.block_sparse_attention(q, k, v, mask, **kw)),
                               atol=1e-6)


@pytest.mark.parametrize("window, causal, match", [
    (0, True, "window=0 is not supported; pass None or an int >= 1"),
    (-4, True, "window=-4 is not supported"),
    (2.5, True, "window=2.5 is not supported"),
    (8, False, "window=8 needs causal=True"),
])
def test_bad_window_raises_value_error(window, causal, match):
    q = jnp.zeros((1, 32, 2, 16))
    k = v = jnp.zeros((1, 32, 1, 16))
    mask = jnp.ones((1, 1, 2, 2), bool)
    tokens = ops.Selection.from_mask(jnp.ones((1, 1, 32, 2), bool), granularity="token")
    kw = dict(block_size=16, causal=causal, window=window)
    for impl, block_mask in (("xla", mask), ("pallas", mask), ("pallas", tokens)):
        with pytest.raises(ValueError, match=match):
            ops.block_sparse_attention(q, k, v, block_mask, impl=impl, **kw)
    if causal:
        with pytest.raises(ValueError, match=match):
            ops.window_block_mask(32, 32, 16, window)


def test_tpu_kernel_rejects_a_window():
    q = jnp.zeros((1, 128, 1, 16))
    mask = jnp.ones((1, 1, 1, 1), bool)
    with pytest.raises(NotImplementedError, match="window=5 is not supported on the TPU kernel"):
        tpu.block_sparse_attention(q, q, q, mask, block_size=128, window=5, interpret=True)
