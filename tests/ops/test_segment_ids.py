"""Document masking (segment ids): Pallas kernels vs the reference, and a packed batch vs each
document alone. Interpret mode on CPU; the compiled class runs on a GPU (marked gpu)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import kernel, reference, scores
from pallas_kernels.block_sparse_tpu import kernel as tpu
from pallas_kernels.block_sparse_tpu import scores as tpu_scores
from sparsetrain import ops
from tests.ops.helpers import GPU_ONLY, seeded_rng
from tests.ops.test_block_sparse_attention import Case, check_against_reference, make_inputs, naive_attention


def document_ids(rng, batch: int, length: int, docs: str):
    """int32 [B, L]: "packed" = ascending ids of random-length documents, "scattered" = any id per
    token (no contiguous documents: every tile crosses a boundary)."""
    if docs == "scattered":
        return rng.integers(0, 3, (batch, length)).astype(np.int32)
    starts = rng.random((batch, length)) < 4.0 / length
    starts[:, 0] = False
    return np.cumsum(starts, axis=1).astype(np.int32)


CASES = [  # (case, docs): the compiled class runs all of them
    (Case(200, block=32, q_heads=4, kv_heads=2, lse=True), "packed"),
    (Case(130, block=16, head_dim=32, q_heads=4, kv_heads=1, batch=2, mask="all"), "packed"),
    (Case(256, block=64, q_heads=2, kv_heads=2, dtype="bfloat16", mask="empty_rows"), "packed"),
    (Case(100, seq_kv=170, block=32, q_heads=2, kv_heads=1, per_q_head=True, lse=True), "packed"),
    (Case(96, block=16, head_dim=32, q_heads=2, kv_heads=1, causal=False), "scattered"),
]
# Interpret mode is slow on CPU: a subset that still covers each axis once (GQA, S > T, lse, block
# sizes 16/32/64, bf16, empty rows, batch 2, packed and scattered documents); the GPU class runs CASES.
INTERPRET_CASES = [
    (Case(100, seq_kv=170, block=32, q_heads=2, kv_heads=1, per_q_head=True, lse=True), "packed"),
    (Case(192, block=64, q_heads=2, kv_heads=2, dtype="bfloat16", mask="empty_rows"), "packed"),
    (Case(50, block=16, head_dim=32, q_heads=4, kv_heads=1, causal=False, batch=2), "scattered"),
]


def segment_inputs(rng, c: Case, docs: str):
    """(SegmentIds, same-document bool [B, T, S]); with S > T the queries are the last T keys."""
    s = c.seq_kv or c.seq
    kv = document_ids(rng, c.batch, s, docs)
    q = kv[:, s - c.seq:]
    return ops.SegmentIds(jnp.asarray(q), jnp.asarray(kv)), jnp.asarray(q[:, :, None] == kv[:, None, :])


class _SegmentTests:
    INTERPRET = True
    CASES = CASES

    def pytest_generate_tests(self, metafunc):
        if metafunc.function.__name__ == "test_matches_reference":
            metafunc.parametrize("c, docs", self.CASES, ids=lambda x: str(x))

    def test_matches_reference(self, c: Case, docs: str, request):
        rng = seeded_rng(request)
        q, k, v, mask = make_inputs(rng, c)
        seg, same_doc = segment_inputs(rng, c, docs)
        kw = dict(causal=c.causal, block_size=c.block, return_lse=True, segment_ids=seg)
        check_against_reference(
            c, rng, q, k, v,
            lambda *a: kernel.block_sparse_attention(*a, mask, interpret=self.INTERPRET, **kw),
            lambda *a: reference.block_sparse_attention(*a, mask, **kw),
            lambda *a: naive_attention(*a, mask, c, c.head_dim ** -0.5, same_doc))

    def test_scores_match_reference(self, request):
        rng = seeded_rng(request)
        c = Case(200, block=32, q_heads=4, kv_heads=2)
        q, k, _, _ = make_inputs(rng, c)
        seg, _ = segment_inputs(rng, c, "packed")
        with kernel.poison_outputs():
            got = scores.block_attention_scores(q, k, block_size=32, segment_ids=seg, interpret=self.INTERPRET)
        with jax.default_matmul_precision("highest"):
            want = reference.block_attention_scores(q, k, block_size=32, segment_ids=seg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


class TestSegmentsInterpret(_SegmentTests):
    INTERPRET = True
    CASES = INTERPRET_CASES


class TestSegmentsCompiled(_SegmentTests):
    INTERPRET = False
    pytestmark = GPU_ONLY


@pytest.mark.parametrize("granularity", ["tile", "token"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_packed_batch_equals_documents_alone(impl, granularity, request):
    """Outputs and gradients of each packed document equal those of the document run alone
    (every causal block selected, per query tile or per query token)."""
    rng = seeded_rng(request)
    lengths, bs, d = (20, 37, 27), 16, 32  # documents end inside tiles 1 and 3
    total = sum(lengths)
    q = jnp.asarray(rng.standard_normal((1, total, 4, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, total, 2, d)), jnp.float32) for _ in range(2))
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ids = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)

    @jax.jit   # one program per length instead of op-by-op dispatch (interpret mode is slow eagerly)
    def attend(q, k, v, seg):
        n = -(-q.shape[1] // bs)
        rows = n if granularity == "tile" else q.shape[1]
        every_block = ops.Selection.from_mask(jnp.ones((1, 2, rows, n), bool), granularity=granularity)
        return ops.block_sparse_attention(q, k, v, every_block, block_size=bs, segment_ids=seg, impl=impl)

    packed, pull = jax.vjp(lambda *a: attend(*a, ids), q, k, v)
    packed_grads = pull(cot)
    start = 0
    for n in lengths:
        cut = lambda x: x[:, start:start + n]  # noqa: E731
        alone, pull = jax.vjp(lambda *a: attend(*a, None), cut(q), cut(k), cut(v))
        np.testing.assert_allclose(np.asarray(cut(packed)), np.asarray(alone), atol=2e-5, rtol=2e-5)
        for g_packed, g_alone in zip(packed_grads, pull(cut(cot))):
            np.testing.assert_allclose(np.asarray(cut(g_packed)), np.asarray(g_alone), atol=2e-5, rtol=2e-5)
        start += n


@pytest.mark.parametrize("ids, match", [
    (lambda b, t, s: jnp.zeros((b, t), jnp.float32), "integer array"),
    (lambda b, t, s: jnp.zeros((b, t + 1), jnp.int32), r"shape \(1, 64\)"),
    (lambda b, t, s: ops.SegmentIds(jnp.zeros((b, t), jnp.int32), jnp.zeros((b, t), jnp.int32)),
     r"segment_ids.kv .*\(1, 96\)"),
    (lambda b, t, s: jnp.zeros((b, t), jnp.int32), "needs seq == seq_kv"),
])
def test_bad_segment_ids_raise_value_error(ids, match):
    q = jnp.zeros((1, 64, 2, 32), jnp.float32)
    k = jnp.zeros((1, 96 if "kv" in match or "seq_kv" in match else 64, 2, 32), jnp.float32)
    n_q, n_k = 4, k.shape[1] // 16
    mask = jnp.ones((1, 2, n_q, n_k), bool)
    with pytest.raises(ValueError, match=match):
        ops.block_sparse_attention(q, k, k, mask, block_size=16, segment_ids=ids(1, 64, k.shape[1]))


def test_tpu_kernel_matches_reference(request):
    """The Mosaic TPU kernels (TPU interpreter) with segment ids: outputs, LSE and gradients."""
    rng = seeded_rng(request)
    c = Case(200, block=128, q_heads=4, kv_heads=2, lse=True)  # ragged: 2 x 2 tiles
    q, k, v, mask = make_inputs(rng, c)
    seg, same_doc = segment_inputs(rng, c, "packed")
    kw = dict(causal=c.causal, block_size=c.block, return_lse=True, segment_ids=seg)
    check_against_reference(
        c, rng, q, k, v,
        lambda *a: tpu.block_sparse_attention(*a, mask, interpret=True, **kw),
        lambda *a: reference.block_sparse_attention(*a, mask, **kw),
        lambda *a: naive_attention(*a, mask, c, c.head_dim ** -0.5, same_doc))


def test_tpu_scores_match_reference(request):
    """The Mosaic TPU block ground truth (TPU interpreter) with segment ids: each document's own map;
    two batch rows with different documents, ragged T (3 x 3 tiles, the last partial)."""
    rng = seeded_rng(request)
    c = Case(300, block=128, q_heads=4, kv_heads=2, batch=2)
    q, k, _, _ = make_inputs(rng, c)
    seg, _ = segment_inputs(rng, c, "packed")
    got = tpu_scores.block_attention_scores(q, k, block_size=128, segment_ids=seg, interpret=True)
    with jax.default_matmul_precision("highest"):
        want = reference.block_attention_scores(q, k, block_size=128, segment_ids=seg)
        plain = reference.block_attention_scores(q, k, block_size=128)
    assert not np.allclose(np.asarray(want), np.asarray(plain), atol=1e-3)   # the documents matter here
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
