"""block_attention_scores (kernel and reference) vs a float64 numpy pooled, normalised softmax map."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import kernel, reference, scores
from sparsetrain import ops
from tests.ops.helpers import GPU_ONLY, seeded_rng

# (seq, seq_kv, block, head_dim, q_heads, kv_heads, dtype, causal)
CASES = [
    (256, 256, 64, 64, 2, 2, "float32", True),
    (200, 200, 32, 128, 4, 2, "bfloat16", True),
    (100, 300, 16, 64, 4, 2, "float32", True),       # seq_kv > seq, offset not a block multiple
    (250, 180, 32, 64, 2, 1, "float32", True),       # seq_kv < seq: early rows see nothing
    (200, 200, 32, 32, 2, 2, "float32", False),
    (1000, 1000, 64, 64, 2, 1, "bfloat16", True),
]


def numpy_scores(q, k, block: int, causal: bool) -> np.ndarray:
    """Float64: softmax map per query head, 2-D max-pool over tiles, rows normalised over key blocks."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, d = q.shape
    s_len, g = k.shape[1], n // k.shape[2]
    s = np.einsum("btnd,bsnd->bnts", q, np.repeat(k, g, axis=2)) / np.sqrt(d)
    allowed = (np.arange(s_len)[None, :] <= np.arange(t)[:, None] + s_len - t) if causal else \
        np.ones((t, s_len), bool)
    s = np.where(allowed, s, -np.inf)
    m = np.where(allowed.any(1)[:, None], s.max(-1, keepdims=True), 0.0)
    p = np.exp(s - m)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    n_q, n_k = -(-t // block), -(-s_len // block)
    padded = np.zeros((b, n, n_q * block, n_k * block))
    padded[:, :, :t, :s_len] = p
    pooled = padded.reshape(b, n, n_q, block, n_k, block).max(axis=(3, 5))
    total = pooled.sum(-1, keepdims=True)
    return np.where(total > 0, pooled / np.where(total > 0, total, 1), 0.0)


def make_qk(rng, t, s, d, n, kh, dtype):
    q = jnp.asarray(1.5 * rng.standard_normal((1, t, n, d)), dtype)
    k = jnp.asarray(rng.standard_normal((1, s, kh, d)), dtype)
    return q, k


class _ScoresTests:
    INTERPRET = True

    @pytest.mark.parametrize("t, s, block, d, n, kh, dtype, causal", CASES)
    def test_kernel_matches_float64(self, t, s, block, d, n, kh, dtype, causal, request):
        q, k = make_qk(seeded_rng(request), t, s, d, n, kh, dtype)
        with kernel.poison_outputs():
            got = jax.jit(lambda q, k: scores.block_attention_scores(
                q, k, block_size=block, causal=causal, interpret=self.INTERPRET))(q, k)
        want = numpy_scores(q, k, block, causal)
        got = np.asarray(got)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.isfinite(got).all(), "unwritten tile"
        # Inputs are the same (rounded) values on both sides: only f32 arithmetic differs.
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


class TestScoresInterpret(_ScoresTests):
    INTERPRET = True


class TestScoresCompiled(_ScoresTests):
    INTERPRET = False
    pytestmark = GPU_ONLY


@pytest.mark.parametrize("t, s, block, d, n, kh, dtype, causal", CASES[:5])
def test_reference_matches_float64(t, s, block, d, n, kh, dtype, causal, request):
    q, k = make_qk(seeded_rng(request), t, s, d, n, kh, dtype)
    got = reference.block_attention_scores(q, k, block_size=block, causal=causal)
    np.testing.assert_allclose(np.asarray(got), numpy_scores(q, k, block, causal), atol=2e-5, rtol=1e-4)


def test_rows_sum_to_one_and_masked_tiles_are_zero(request):
    q, k = make_qk(seeded_rng(request), 250, 180, 64, 2, 1, "float32")
    got = np.asarray(ops.block_attention_scores(q, k, block_size=32, impl="xla"))
    visible = np.asarray(ops.causal_block_mask(250, 180, 32))
    assert (got[..., ~visible] == 0).all()
    sums = got.sum(-1)
    has_keys = visible.any(-1)
    np.testing.assert_allclose(sums[..., has_keys], 1.0, rtol=1e-5)
    assert (sums[..., ~has_keys] == 0).all()


def test_signatures_match_and_no_gradient():
    assert inspect.signature(scores.block_attention_scores) == inspect.signature(
        reference.block_attention_scores)
    q = jnp.ones((1, 32, 2, 16))
    grad = jax.grad(lambda q: ops.block_attention_scores(q, q, block_size=16, impl="xla").sum())(q)
    assert (np.asarray(grad) == 0).all()


def test_bad_inputs_raise_value_error():
    q = jnp.zeros((1, 64, 3, 32))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ops.block_attention_scores(q, jnp.zeros((1, 64, 2, 32)))
    with pytest.raises(ValueError, match="block_size"):
        ops.block_attention_scores(q, q, block_size=24)
    with pytest.raises(ValueError, match="agree in batch and head_dim"):
        ops.block_attention_scores(q, jnp.zeros((1, 64, 3, 16)))
