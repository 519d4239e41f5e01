"""attention_with_block_scores: the fused forward (dense attention + block ground truth from one
pass) vs its reference, vs the two-pass `block_attention_scores`, and the dispatch.

Kernel runs happen inside `kernel.poison_outputs()`: a tile the forward forgets to write, or an
unwritten row maximum that reaches the scores, is NaN. The interpret class runs on CPU; the same
tests run compiled on a GPU (class `TestFusedCompiled`, marked gpu).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import common, kernel, reference, scores
from sparsetrain import ops
from tests.ops.helpers import GPU_ONLY, assert_close, seeded_rng
from tests.ops.test_block_sparse_attention import Case, make_inputs, naive_attention, run_vjp
from tests.ops.test_segment_ids import segment_inputs
from tests.tolerances import assert_close_to_scale

# (case, documents or None). Small shapes: each case interprets the forward, dq and dk/dv kernels.
# Axes: GQA 1 / 2 / 4, blocks 32 and 64, ragged T, S > T, bf16, batch 2, packed and scattered
# documents, non-causal.
CASES = [
    (Case(130, block=64, head_dim=32, q_heads=2, kv_heads=2, mask="all"), "packed"),
    (Case(200, block=32, head_dim=32, q_heads=4, kv_heads=1, mask="all"), None),
    (Case(150, block=32, head_dim=32, q_heads=4, kv_heads=1, mask="all", dtype="bfloat16", batch=2),
     "packed"),
    (Case(100, block=32, head_dim=32, q_heads=2, kv_heads=1, mask="all", causal=False), "scattered"),
    (Case(90, seq_kv=160, block=32, head_dim=32, q_heads=4, kv_heads=2, mask="all"), None),
]


def fused_inputs(request, c: Case, docs):
    rng = seeded_rng(request)
    q, k, v, every_tile = make_inputs(rng, c)
    seg, same_doc = segment_inputs(rng, c, docs) if docs else (None, None)
    do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    return q, k, v, every_tile, seg, same_doc, do


class _FusedTests:
    INTERPRET = True

    @pytest.mark.parametrize("c, docs", CASES, ids=str)
    def test_matches_reference(self, c: Case, docs, request):
        """o, its gradients and the scores against the reference (float32 truth, plain attention in
        the inputs' dtype as the tolerance baseline)."""
        q, k, v, every_tile, seg, same_doc, do = fused_inputs(request, c, docs)
        kw = dict(block_size=c.block, causal=c.causal, segment_ids=seg)
        with kernel.poison_outputs():
            (o, got), grads = run_vjp(jax.jit(lambda *a: kernel.attention_with_block_scores(
                *a, interpret=self.INTERPRET, **kw)), q, k, v, (do,), with_lse=False)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        truth = jax.jit(lambda *a: reference.attention_with_block_scores(*a, **kw))
        naive = jax.jit(lambda *a: naive_attention(*a, every_tile, c, c.head_dim ** -0.5, same_doc))
        with jax.default_matmul_precision("highest"):  # jitted: eager dispatch costs more than compiling
            (o_t, want), grads_t = run_vjp(truth, *f32, (do,), with_lse=False)
            (o_n, _), grads_n = run_vjp(naive, q, k, v, (do,), with_lse=False)

        assert o.dtype == q.dtype and o.shape == q.shape
        assert_close("o", o, o_n, o_t, c.dtype)
        for name, g, g_n, g_t in zip(("dq", "dk", "dv"), grads, grads_n, grads_t):
            assert g.dtype == q.dtype
            assert_close(name, g, g_n, g_t, c.dtype)
        got = np.asarray(got)
        assert got.dtype == np.float32 and got.shape == (c.batch, c.q_heads, *every_tile.shape[2:])
        assert np.isfinite(got).all(), "an unwritten row maximum reached the scores"
        # Same rounded inputs on both sides: only f32 arithmetic differs.
        np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=1e-4)

    @pytest.mark.parametrize("c, docs", CASES[2:3], ids=str)  # GQA 4, ragged, bf16, batch 2, documents
    def test_scores_equal_the_two_pass_kernel(self, c: Case, docs, request):
        q, k, v, _, seg, _, _ = fused_inputs(request, c, docs)
        kw = dict(block_size=c.block, causal=c.causal, segment_ids=seg, interpret=self.INTERPRET)
        with kernel.poison_outputs():
            _, got = jax.jit(lambda *a: kernel.attention_with_block_scores(*a, **kw))(q, k, v)
            two_pass = jax.jit(lambda q, k: scores.block_attention_scores(q, k, **kw))(q, k)
        # The same LSE and tile maxima, up to the order of a max and a subtraction.
        np.testing.assert_allclose(np.asarray(got), np.asarray(two_pass), atol=1e-6, rtol=1e-5)


class TestFusedInterpret(_FusedTests):
    INTERPRET = True


class TestFusedCompiled(_FusedTests):
    INTERPRET = False
    pytestmark = GPU_ONLY


def test_ops_dispatch_and_gradients(request):
    case = Case(80, block=16, head_dim=16, q_heads=4, kv_heads=2)
    q, k, v, _, seg, _, do = fused_inputs(request, case, "packed")
    kw = dict(block_size=16, segment_ids=seg, impl="xla")
    fused = jax.jit(lambda q: ops.attention_with_block_scores(q, k, v, **kw))
    o, got = fused(q)
    assert_close_to_scale(got, ops.block_attention_scores(q, k, **kw), rel=1e-6)
    o_dense = ops.block_sparse_attention(q, k, v, common.every_tile(q, k, 16), **kw)
    assert_close_to_scale(o, o_dense, rel=1e-6)
    # o carries the gradient, the scores none (cut in the op, whatever the backend).
    grad_o = jax.jit(jax.grad(lambda q: jnp.vdot(fused(q)[0], do)))(q)
    assert np.abs(np.asarray(grad_o)).max() > 0
    grad_s = jax.jit(jax.grad(lambda q: fused(q)[1].sum()))(q)
    np.testing.assert_array_equal(np.asarray(grad_s), 0.0)
    with pytest.raises(NotImplementedError, match="no TPU kernel"):
        ops.attention_with_block_scores(q, k, v, block_size=128, impl="pallas_tpu")


def test_signatures_match():
    assert inspect.signature(kernel.attention_with_block_scores) == inspect.signature(
        reference.attention_with_block_scores)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bad_inputs_raise_value_error(impl):
    q = jnp.zeros((1, 64, 4, 32))
    kv = jnp.zeros((1, 64, 2, 32))
    fused = lambda *a, **kw: ops.attention_with_block_scores(*a, impl=impl, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="block_size=24"):
        fused(q, kv, kv, block_size=24)
    with pytest.raises(ValueError, match="v must match k"):
        fused(q, kv, jnp.zeros((1, 64, 2, 16)))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        fused(q, jnp.zeros((1, 64, 3, 32)), jnp.zeros((1, 64, 3, 32)))
    with pytest.raises(ValueError, match=r"segment_ids\.q"):
        fused(q, kv, kv, segment_ids=jnp.zeros((1, 63), jnp.int32))


def test_row_maxima_forward_lowers_to_triton():
    """Pallas's Triton lowering of the fused forward (and its backward) for an H100, without a GPU:
    the row-maxima store is expressible in Triton IR. Not Triton's own compiler passes."""
    q = jnp.zeros((1, 200, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 200, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        o, s = kernel.attention_with_block_scores(q, k, v, block_size=64)
        return o.astype(jnp.float32).sum() + s.sum()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "block_sparse_fwd_row_maxima" in text and "block_sparse_dkv" in text
