"""block_sparse_attention on Pallas Mosaic TPU: the kernels in TPU interpret mode vs the reference.

Runs on CPU (`interpret=True` = `pltpu.InterpretParams()`), forward, LSE and gradients, with fresh
random inputs and masks (seeded_rng; SPARSETRAIN_TEST_SEED replays a failure). A TPU-lowering
test checks that the same kernels lower to Mosaic (`tpu_custom_call`) without a TPU.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import reference
from pallas_kernels.block_sparse_tpu import kernel as tpu
from pallas_kernels.block_sparse_tpu import scores
from tests.ops.helpers import assert_close, seeded_rng
from tests.ops.test_block_attention_scores import make_qk, numpy_scores
from tests.ops.test_block_sparse_attention import Case, make_inputs, naive_attention, run_vjp

B128 = dict(block=128, head_dim=128)
# The TPU interpreter is slow on CPU: each axis once rather than their cross product.
CASES = [
    Case(300, q_heads=4, kv_heads=2, lse=True, **B128),                         # GQA, ragged T = S
    Case(200, seq_kv=330, q_heads=4, kv_heads=2, per_q_head=True, lse=True, **B128),  # S > T, H = N
    Case(300, seq_kv=180, q_heads=2, kv_heads=1, **B128),             # S < T: early rows see nothing
    Case(256, q_heads=2, kv_heads=2, mask="empty_rows", causal=False, lse=True, **B128),  # N = K
    Case(256, q_heads=4, kv_heads=2, mask="single", batch=2, dtype="bfloat16", **B128),
    Case(200, block=128, head_dim=72, q_heads=2, kv_heads=1, mask="all"),    # head_dim padded to 128
]


def _cotangents(rng, c: Case, q):
    return (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
            jnp.asarray(rng.standard_normal((c.batch, c.q_heads, c.seq)), jnp.float32))


def _check(c: Case, q, k, v, cot, got, truth_mask, truth_block):
    """got = ((o, lse), grads) of the TPU kernel; truth from the reference (and the naive baseline)."""
    (o, lse), grads = got
    kw = dict(causal=c.causal, block_size=truth_block, return_lse=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    nc = dataclasses.replace(c, block=truth_block)
    # Everything passed as arguments: closed-over arrays would be constant-folded by XLA (slow).
    with jax.default_matmul_precision("highest"):
        (o_t, lse_t), grads_t = jax.jit(lambda x, m, ct: run_vjp(
            lambda *a: reference.block_sparse_attention(*a, m, **kw), *x, ct, c.lse))(f32, truth_mask, cot)
        (o_n, lse_n), grads_n = jax.jit(lambda x, m, ct: run_vjp(
            lambda *a: naive_attention(*a, m, nc, c.head_dim ** -0.5), *x, ct, c.lse))((q, k, v), truth_mask, cot)

    assert o.dtype == q.dtype and o.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (c.batch, c.q_heads, c.seq)
    assert_close("o", o, o_n, o_t, c.dtype)
    lse, lse_t, lse_n = (np.asarray(x) for x in (lse, lse_t, lse_n))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_t), "empty rows differ")
    assert not np.isnan(lse).any() and not np.isposinf(lse).any()
    fin = np.isfinite(lse_t)
    assert fin.any(), "no visible row: a vacuous case"
    assert_close("lse", lse[fin], lse_n[fin], lse_t[fin], c.dtype)
    for name, g, g_n, g_t in zip(("dq", "dk", "dv"), grads, grads_n, grads_t):
        assert g.dtype == q.dtype and g.shape == g_t.shape
        assert_close(name, g, g_n, g_t, c.dtype)


def _tpu_vjp(mask, c: Case, q, k, v, cot, interpret=True):
    def run(x, m, ct):
        fn = lambda q, k, v: tpu.block_sparse_attention(  # noqa: E731
            q, k, v, m, causal=c.causal, block_size=c.block, interpret=interpret, return_lse=True)
        return run_vjp(fn, *x, ct, c.lse)
    return jax.jit(run)((q, k, v), mask, cot)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_matches_reference(c: Case, request):
    rng = seeded_rng(request)
    q, k, v, mask = make_inputs(rng, c)
    if c.mask != "single":  # never all empty: the last query block always sees key block 0
        mask = mask.at[0, 0, -1, 0].set(True)
    cot = _cotangents(rng, c, q)
    _check(c, q, k, v, cot, _tpu_vjp(mask, c, q, k, v, cot), mask, c.block)


def test_block_256_matches_reference_at_128(request):
    """A 256 tile is a 2x2 group of 128 tiles: the reference (block <= 128) on the upsampled mask
    has the same semantics. Also passes an InterpretParams instance through."""
    rng = seeded_rng(request)
    c = Case(300, seq_kv=400, block=256, head_dim=128, q_heads=4, kv_heads=2, per_q_head=True, lse=True)
    q, k, v, mask = make_inputs(rng, c)
    cot = _cotangents(rng, c, q)
    up = jnp.repeat(jnp.repeat(mask, 2, axis=2), 2, axis=3)[:, :, :-(-c.seq // 128), :-(-400 // 128)]
    got = _tpu_vjp(mask, c, q, k, v, cot, interpret=tpu.pltpu.InterpretParams(uninitialized_memory="nan"))
    _check(c, q, k, v, cot, got, up, 128)


def test_empty_mask_gives_zeros_and_zero_grads(request):
    rng = seeded_rng(request)
    c = Case(200, q_heads=4, kv_heads=2, **B128)
    q, k, v, mask = make_inputs(rng, c)
    mask = jnp.zeros_like(mask)
    f = lambda q, k, v: tpu.block_sparse_attention(  # noqa: E731
        q, k, v, mask, block_size=128, interpret=True, return_lse=True)
    (o, lse), pull = jax.vjp(f, q, k, v)
    np.testing.assert_array_equal(np.asarray(o), 0.0)
    assert np.isneginf(np.asarray(lse)).all()
    for g in pull((jnp.ones_like(o), jnp.ones_like(lse))):
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_slot_lists_repeat_the_last_block():
    """Padding slots hold the row's last selected block (no new DMA); empty rows hold 0."""
    mask = jnp.asarray([[[[False, True, False, True], [False] * 4, [True, False, False, False]]]])
    data, cnt = tpu.slot_lists(mask)
    np.testing.assert_array_equal(np.asarray(cnt), [2, 0, 1])
    np.testing.assert_array_equal(np.asarray(data).reshape(3, 4),
                                  [[1, 3, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("dtype, mask_heads, block, head_dim, segmented", [
    ("float32", 2, 128, 128, False), ("bfloat16", 4, 256, 64, False), ("bfloat16", 2, 128, 128, True)])
def test_lowers_to_mosaic_tpu(dtype, mask_heads, block, head_dim, segmented):
    """Forward + backward lower for the TPU platform without a TPU: the Pallas -> Mosaic lowering
    accepts every op, block shape and index map (libtpu's own compile is not run here)."""
    dt = jnp.dtype(dtype)
    q = jax.ShapeDtypeStruct((1, 300, 4, head_dim), dt)
    kv = jax.ShapeDtypeStruct((1, 300, 2, head_dim), dt)
    n = -(-300 // block)
    mask = jax.ShapeDtypeStruct((1, mask_heads, n, n), jnp.bool_)
    ids = jax.ShapeDtypeStruct((1, 300), jnp.int32) if segmented else None

    def loss(q, k, v, m, ids):
        o, lse = tpu.block_sparse_attention(q, k, v, m, block_size=block, segment_ids=ids, return_lse=True)
        return o.astype(jnp.float32).sum() + lse.sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, mask, ids).lower(
        lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3  # fwd, dq, dk/dv


def test_signature_matches_reference():
    assert inspect.signature(tpu.block_sparse_attention) == inspect.signature(
        reference.block_sparse_attention)


@pytest.mark.parametrize("change, match", [
    (dict(block=64), r"block_size=64 is not supported on TPU; choose one of \(128, 256, 512\)"),
    (dict(block=192), r"block_size=192 .*\(128, 256, 512\)"),
    (dict(block=32), "block_size=32"),
    (dict(mask_shape=(1, 2, 2, 3)), "block_mask must be"),
    (dict(mask_shape=(1, 3, 2, 2)), "block_mask must be"),
    (dict(mask_shape=(1, 2, 1, 1), block=128), r"block_mask must be .*2, 2\].*block_size=128"),
    (dict(mask_dtype=jnp.int32), "block_mask must be bool"),
    (dict(kv_heads=3, q_heads=4, mask_shape=(1, 3, 1, 1)), "multiple of num_kv_heads"),
    (dict(k_dtype=jnp.bfloat16), "share one dtype"),
    (dict(q_dtype=jnp.int32, k_dtype=jnp.int32), "share one dtype"),
    (dict(v_len=128), "v must match k"),
])
def test_bad_inputs_raise_value_error(change, match):
    g = dict(q_heads=4, kv_heads=2, mask_shape=None, mask_dtype=bool, q_dtype=jnp.float32,
             k_dtype=jnp.float32, block=256, v_len=200) | change
    q = jnp.zeros((1, 200, g["q_heads"], 64), g["q_dtype"])
    k = jnp.zeros((1, 200, g["kv_heads"], 64), g["k_dtype"])
    v = jnp.zeros((1, g["v_len"], g["kv_heads"], 64), g["k_dtype"])
    mask = jnp.ones(g["mask_shape"] or (1, g["kv_heads"], 1, 1), g["mask_dtype"])
    with pytest.raises(ValueError, match=match):
        tpu.block_sparse_attention(q, k, v, mask, block_size=g["block"], interpret=True)


# ------------------------------------------------------------------------------------------------
# block_attention_scores

# (seq, seq_kv, block, head_dim, q_heads, kv_heads, dtype, causal)
SCORE_CASES = [
    (300, 300, 128, 128, 4, 2, "float32", True),
    (200, 470, 128, 64, 2, 1, "float32", True),     # S > T, offset not a block multiple
    (300, 180, 128, 128, 2, 2, "float32", True),    # S < T: early rows see nothing
    (256, 300, 128, 128, 2, 1, "float32", False),
    (300, 400, 256, 128, 2, 1, "bfloat16", True),
]


@pytest.mark.parametrize("t, s, block, d, n, kh, dtype, causal", SCORE_CASES)
def test_scores_match_float64(t, s, block, d, n, kh, dtype, causal, request):
    q, k = make_qk(seeded_rng(request), t, s, d, n, kh, dtype)
    got = jax.jit(lambda q, k: scores.block_attention_scores(
        q, k, block_size=block, causal=causal, interpret=True))(q, k)
    want = numpy_scores(q, k, block, causal)
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_scores_signature_and_errors():
    assert inspect.signature(scores.block_attention_scores) == inspect.signature(
        reference.block_attention_scores)
    q = jnp.zeros((1, 200, 4, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"block_size=64 is not supported on TPU"):
        scores.block_attention_scores(q, q[:, :, :2], block_size=64, interpret=True)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        scores.block_attention_scores(q, q[:, :, :3], block_size=128, interpret=True)


@pytest.mark.parametrize("segmented", [False, True])
def test_scores_lower_to_mosaic_tpu(segmented):
    q = jax.ShapeDtypeStruct((1, 300, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 300 if segmented else 400, 2, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 300), jnp.int32) if segmented else None
    lowered = jax.jit(lambda q, k, ids: scores.block_attention_scores(
        q, k, block_size=128, segment_ids=ids)).trace(q, k, ids).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 2  # lse pass, pool pass
