"""key_bias (an additive per-key bias, DMA / NOSA): the Triton tile kernel against the reference
(outputs, LSE, and the gradients of q, k, v and the bias) and dBias against finite differences of
the kernel, the reference against a plain biased softmax, and bad inputs. Interpret mode on CPU; the same kernel
checks run compiled on a GPU (marked gpu)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import common, kernel, reference
from sparsetrain import ops
from tests.ops.helpers import GPU_ONLY, seeded_rng
from tests.tolerances import assert_close_to_scale

# (T, S, block, head_dim, q heads, kv heads, packed documents): ragged lengths throughout.
CASES = [
    (100, 100, 16, 32, 2, 1, False),   # GQA 2:1: dBias sums over the group
    (80, 130, 32, 16, 2, 2, True),     # S > T, documents (masked tiles compare ids)
]
MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=GPU_ONLY)]


def biased_inputs(rng, t, s, block, dh, n, kh, docs):
    q = jnp.asarray(1.5 * rng.standard_normal((1, t, n, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, s, kh, dh)), jnp.float32) for _ in range(2))
    # Large enough to reorder the softmax: DMA / NOSA biases are A * softplus(.) with A learned.
    bias = jnp.asarray(2.0 * rng.standard_normal((1, kh, s)), jnp.float32)
    mask = jnp.asarray(rng.random((1, kh, -(-t // block), -(-s // block))) < 0.6)
    seg = None
    if docs:
        cut = int(rng.integers(s // 4, s // 2))
        seg = common.SegmentIds(jnp.asarray((np.arange(t) + s - t >= cut)[None] + 1, jnp.int32),
                                jnp.asarray((np.arange(s) >= cut)[None] + 1, jnp.int32))
    return q, k, v, bias, mask, seg


def value_and_grads(fn, args, cot):
    """((o, lse), gradients of sum(o * do) + sum(lse * dlse) in every argument)."""
    out, pull = jax.vjp(fn, *args)
    return out, pull(cot)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t, s, block, dh, n, kh, docs", CASES, ids=str)
def test_kernel_matches_reference_and_finite_differences(t, s, block, dh, n, kh, docs, interpret, request):
    """Outputs, LSE and all four gradients against the reference; and dBias along a random
    direction u against central differences of the kernel's own forward (the same program)."""
    rng = seeded_rng(request)
    q, k, v, bias, mask, seg = biased_inputs(rng, t, s, block, dh, n, kh, docs)
    kw = dict(block_size=block, segment_ids=seg, return_lse=True)
    cot = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
           jnp.asarray(rng.standard_normal((1, n, t)), jnp.float32))
    run = jax.jit(lambda *a: kernel.block_sparse_attention(*a[:3], mask, key_bias=a[3], interpret=interpret, **kw))
    with kernel.poison_outputs():
        got, grads = value_and_grads(run, (q, k, v, bias), cot)
    with jax.default_matmul_precision("highest"):
        want, grads_t = value_and_grads(
            jax.jit(lambda *a: reference.block_sparse_attention(*a[:3], mask, key_bias=a[3], **kw)),
            (q, k, v, bias), cot)
    assert_close_to_scale(got[0], want[0], 2e-5, err_msg="o")
    finite = np.isfinite(np.asarray(want[1]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got[1])), finite)
    assert_close_to_scale(np.asarray(got[1])[finite], np.asarray(want[1])[finite], 2e-5, err_msg="lse")
    for name, g, g_t in zip(("dq", "dk", "dv", "dbias"), grads, grads_t):
        assert g.shape == g_t.shape and g.dtype == g_t.dtype, name
        assert_close_to_scale(g, g_t, 1e-4, err_msg=name)
    # The bias matters here (a test of it that a zero bias would also pass proves nothing).
    assert float(jnp.abs(grads[3]).max()) > 1e-2

    def loss(b):  # the cotangents' loss; rows with no visible key (lse -inf) do not depend on b
        o, lse = run(q, k, v, b)
        return float(jnp.sum(o * cot[0]) + jnp.sum(jnp.where(finite, lse, 0.0) * cot[1]))

    u, eps = jnp.asarray(rng.standard_normal(bias.shape), jnp.float32), 1e-2
    with kernel.poison_outputs():
        numeric = (loss(bias + eps * u) - loss(bias - eps * u)) / (2 * eps)
    # Central differences in float32: truncation O(eps^2) and rounding ~1e-7 |f| / eps.
    np.testing.assert_allclose(float(jnp.sum(grads[3] * u)), numeric, rtol=2e-3, atol=2e-3)


def test_reference_is_a_biased_softmax(request):
    """The reference against plain numpy: softmax(q k^T scale + bias[j]) over the causal keys."""
    rng = seeded_rng(request)
    t = s = 40
    q, k, v, bias, _, _ = biased_inputs(rng, t, s, 16, 16, 2, 1, False)
    every = common.every_tile(q, k, 16)
    o = reference.block_sparse_attention(q, k, v, every, block_size=16, key_bias=bias)
    qn, kn, vn, bn = (np.asarray(x, np.float64) for x in (q, k, v, bias))
    logits = np.einsum("btnd,bsd->bnts", qn, kn[:, :, 0]) / 4.0 + bn[:, :, None, :]
    logits = np.where(np.tri(t, dtype=bool), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bnts,bsd->btnd", p / p.sum(-1, keepdims=True), vn[:, :, 0])
    np.testing.assert_allclose(np.asarray(o), want, atol=2e-5, rtol=2e-5)


def test_bad_key_bias_names_the_field():
    q = jnp.zeros((1, 32, 2, 16))
    k = v = jnp.zeros((1, 32, 1, 16))
    every = common.every_tile(q, k, 16)
    for impl in ("xla", "pallas"):
        with pytest.raises(ValueError, match=r"key_bias must be a float array of shape .* = \(1, 1, 32\)"):
            ops.block_sparse_attention(q, k, v, every, block_size=16, key_bias=jnp.zeros((1, 2, 32)),
                                       impl=impl, interpret=True)
    with pytest.raises(NotImplementedError, match="key_bias is not supported by the Mosaic TPU kernel"):
        ops.block_sparse_attention(q, k, v, every, block_size=16, key_bias=jnp.zeros((1, 1, 32)),
                                   impl="pallas_tpu")
