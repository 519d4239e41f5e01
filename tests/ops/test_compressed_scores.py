"""InfLLM-V2's fused block-score kernel against its jnp reference (fresh random inputs, GQA 1 to 4
and the 125M model's 3, ragged lengths, every block size, bf16), the reference against a float64
window-by-window definition, and the named errors. The interpret class runs on CPU; the compiled
class on a GPU (`pytest -m gpu`)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.compressed_scores import kernel, reference
from sparsetrain.sparse.infllm_v2 import window_means
from tests.ops.helpers import GPU_ONLY, seeded_rng


@dataclasses.dataclass(frozen=True)
class Case:
    seq: int
    block: int = 16
    windows: tuple[int, int, int, int] = (8, 4, 16, 8)   # kernel_size, stride, coarse size, stride
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    dtype: str = "float32"
    documents: bool = False   # packed rows: random document starts
    pool: str = "max"         # "overlap": NSA's importance (coarse windows = fine ones)

    def __str__(self):
        return (f"T{self.seq}-bs{self.block}-w{'_'.join(map(str, self.windows))}-h{self.heads}_{self.kv_heads}"
                f"-d{self.head_dim}-{self.dtype}{'-docs' if self.documents else ''}-{self.pool}")


CASES = [Case(100), Case(128, windows=(8, 4, 32, 16)), Case(75, windows=(12, 4, 16, 8), heads=4, kv_heads=4),
         Case(200, block=32, windows=(16, 8, 32, 16), heads=4, kv_heads=1), Case(130, block=64, windows=(32, 16, 128, 64), heads=6, kv_heads=2),
         Case(300, block=128, windows=(32, 16, 128, 64), heads=2, kv_heads=2, head_dim=64),
         Case(257, block=64, windows=(32, 16, 128, 64), heads=12, kv_heads=4, head_dim=64, dtype="bfloat16"),
         Case(150, documents=True), Case(200, block=32, windows=(16, 8, 32, 16), heads=8, kv_heads=2, documents=True),
         # NSA: overlapping windows (2 per stride-chunk pair), packed rows, and fla-org's one-block windows.
         Case(100, windows=(8, 4, 8, 4), pool="overlap"),
         Case(130, block=64, windows=(32, 16, 32, 16), heads=6, kv_heads=2, documents=True, pool="overlap"),
         Case(70, windows=(16, 16, 16, 16), pool="overlap")]


def inputs(rng, c: Case):
    q = jnp.asarray(rng.normal(size=(2, c.seq, c.heads, c.head_dim)), c.dtype)
    k = jnp.asarray(rng.normal(size=(2, c.seq, c.kv_heads, c.head_dim)), c.dtype)
    size, stride, coarse, coarse_stride = c.windows
    kw = dict(block_size=c.block, kernel_size=size, kernel_stride=stride, coarse_size=coarse,
              coarse_stride=coarse_stride, pool=c.pool)
    if c.documents:   # each row: documents starting at a few random tokens
        starts = np.zeros((2, c.seq), np.int32)
        for row in starts:
            for first in sorted(rng.choice(np.arange(1, c.seq), 3, replace=False)):
                row[first:] = first
        kw["doc_start"] = jnp.asarray(starts)
    return q, window_means(k, size, stride), window_means(k, coarse, coarse_stride), kw


class _KernelTests:
    INTERPRET = True

    @pytest.mark.parametrize("c", CASES, ids=str)
    def test_matches_reference(self, c: Case, request):
        q, fine, coarse, kw = inputs(seeded_rng(request), c)
        with jax.default_matmul_precision("highest"):
            want = reference.token_block_scores(q, fine, coarse, query_chunk=64, **kw)
            got = kernel.token_block_scores(q, fine, coarse, interpret=self.INTERPRET, **kw)
        assert got.shape == want.shape == (2, c.kv_heads, c.seq, -(-c.seq // c.block)) and got.dtype == jnp.float32
        # bf16 inputs: both round the logits' products differently inside exp; relative to each row's max.
        tol = 1e-5 if c.dtype == "float32" else 3e-2
        scale = np.maximum(np.asarray(want).max(-1, keepdims=True), 1e-6)
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=tol)


class TestKernelInterpret(_KernelTests):
    INTERPRET = True


class TestKernelCompiled(_KernelTests):
    INTERPRET = False
    pytestmark = GPU_ONLY


def definition(q, k, c: Case):
    """float64 [B, K, T, nK] straight from the method notes, token by token and window by window:
    per head, lse over the coarse windows seen; per window seen, exp(logit - lse) summed over the
    group; per block, the max of those sums over the windows overlapping it."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    size, stride, coarse_size, coarse_stride = c.windows
    b, t, n, d = q.shape
    means = lambda l, s: [k[:, w * s:w * s + l].mean(1) for w in range((t - l) // s + 1)]  # noqa: E731
    fine, coarse = means(size, stride), means(coarse_size, coarse_stride)
    n_k, g = -(-t // c.block), n // k.shape[2]
    out = np.zeros((b, k.shape[2], t, n_k))
    for tok in range(t):
        seen2 = [w for w in range(len(coarse)) if w * coarse_stride + coarse_size - 1 <= tok]
        seen = [w for w in range(len(fine)) if w * stride + size - 1 <= tok]
        if not seen2:
            continue
        for kh in range(k.shape[2]):
            window_sum = np.zeros((b, len(fine)))
            for h in range(kh * g, (kh + 1) * g):
                logit = lambda keys: (q[:, tok, h] * keys[:, kh]).sum(-1) / math.sqrt(d)  # noqa: E731
                lse = np.log(sum(np.exp(logit(coarse[w])) for w in seen2))
                for w in seen:
                    window_sum[:, w] += np.exp(logit(fine[w]) - lse)
            for j in range(n_k):
                over = [w for w in seen if w * stride < (j + 1) * c.block and w * stride + size > j * c.block]
                if over:
                    out[:, kh, tok, j] = window_sum[:, over].max(-1)
    return out


@pytest.mark.parametrize("c", [Case(70), Case(64, windows=(12, 4, 32, 16), heads=3, kv_heads=1)], ids=str)
def test_reference_matches_the_definition(c: Case, request):
    rng = seeded_rng(request)
    q = jnp.asarray(rng.normal(size=(2, c.seq, c.heads, c.head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, c.seq, c.kv_heads, c.head_dim)), jnp.float32)
    size, stride, coarse_size, coarse_stride = c.windows
    with jax.default_matmul_precision("highest"):
        got = reference.token_block_scores(q, window_means(k, size, stride), window_means(k, coarse_size, coarse_stride),
                                           block_size=c.block, kernel_size=size, kernel_stride=stride,
                                           coarse_size=coarse_size, coarse_stride=coarse_stride, query_chunk=32)
    np.testing.assert_allclose(np.asarray(got), definition(q, k, c), rtol=1e-5, atol=1e-7)


def test_a_document_scores_as_if_alone(request):
    """Packed at a block boundary, the second document's tokens score its blocks as it does alone."""
    rng = seeded_rng(request)
    c = Case(96)
    q, _, _, kw = inputs(rng, c)
    k = jnp.asarray(rng.normal(size=(2, c.seq, c.kv_heads, c.head_dim)), jnp.float32)
    size, stride, coarse_size, coarse_stride = c.windows
    means = lambda keys: (window_means(keys, size, stride), window_means(keys, coarse_size, coarse_stride))  # noqa: E731
    start = 48
    doc_start = jnp.where(jnp.arange(c.seq) < start, 0, start).astype(jnp.int32)[None].repeat(2, 0)
    with jax.default_matmul_precision("highest"):
        packed = reference.token_block_scores(q, *means(k), doc_start=doc_start, **kw)
        alone = reference.token_block_scores(q[:, start:], *means(k[:, start:]), **kw)
    np.testing.assert_allclose(np.asarray(packed[:, :, start:, start // c.block:]), np.asarray(alone), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(packed[:, :, start:, :start // c.block]), 0.0)


def test_kernel_and_reference_signatures_match():
    assert inspect.signature(kernel.token_block_scores) == inspect.signature(reference.token_block_scores)


@pytest.mark.parametrize("change,match", [
    (dict(kernel_size=10), "kernel_stride must divide"), (dict(kernel_stride=3, kernel_size=9), "kernel_stride must divide"),
    (dict(coarse_size=20), "coarse_stride must divide"), (dict(kernel_size=28), "kernel_size=28 may overlap"),
    (dict(fine_heads=3), "must share batch, kv heads"), (dict(pool="mean"), r"pool='mean'; choose one of")])
@pytest.mark.parametrize("fn", [kernel.token_block_scores, reference.token_block_scores], ids=["kernel", "reference"])
def test_bad_inputs_raise_value_error(fn, change, match):
    q = jnp.zeros((1, 64, 4, 16))
    change = dict(change)
    heads = change.pop("fine_heads", 2)
    fine, coarse = jnp.zeros((1, 15, heads, 16)), jnp.zeros((1, 3, 2, 16))
    kw = dict(block_size=16, kernel_size=8, kernel_stride=4, coarse_size=16, coarse_stride=8) | change
    with pytest.raises(ValueError, match=match):
        fn(q, fine, coarse, interpret=True, **kw)
