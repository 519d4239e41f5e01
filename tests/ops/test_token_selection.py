"""Token-level selection (NSA / InfLLM-V2 / MoBA layout): the Triton token kernels vs the reference.

Each query token has its own sorted list of key blocks, shared by the query heads of its
selection head. Both loop orders run: query-outer (`token_kernel`) and key-block-outer
(`token_gather_kernel`). Interpret mode on CPU; the compiled classes run on a GPU (marked gpu).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import kernel, reference
from pallas_kernels.block_sparse_tpu import kernel as tpu
from sparsetrain import ops
from tests.ops.helpers import GPU_ONLY, seeded_rng
from tests.ops.test_block_sparse_attention import Case, check_against_reference, naive_attention
from tests.ops.test_segment_ids import segment_inputs

CASES = [  # (case, max_blocks per token, segment ids): the compiled class runs all of them
    (Case(70, block=16, head_dim=32, q_heads=2, kv_heads=2), 3, False),              # G=1, ragged
    (Case(100, block=32, q_heads=4, kv_heads=2, lse=True), 2, False),                # G=2
    (Case(64, block=16, head_dim=32, q_heads=4, kv_heads=1, mask="empty_rows", dtype="bfloat16"), 4, False),
    (Case(40, block=16, head_dim=32, q_heads=16, kv_heads=1, lse=True), 3, False),   # G=16: one token a tile
    (Case(50, block=16, head_dim=32, q_heads=4, kv_heads=2, per_q_head=True), 2, False),  # a list per head
    (Case(40, seq_kv=90, block=16, head_dim=72, q_heads=4, kv_heads=1), 3, False),   # S > T, D padded
    (Case(60, block=16, head_dim=32, q_heads=2, kv_heads=1, causal=False, batch=2), 2, False),
    (Case(80, block=16, head_dim=32, q_heads=4, kv_heads=1, lse=True), 3, True),     # documents
    (Case(66, block=16, head_dim=32, q_heads=6, kv_heads=2, lse=True), 3, True),     # G=3 (key order only)
]
# Interpret mode is slow on CPU: a subset that still covers each axis once (G = 2, 4, 16, lists per
# q head, S > T with D padded, blocks 16/32, bf16, empty rows, non-causal, batch 2, documents, lse);
# the GPU class runs CASES.
INTERPRET_CASES = [
    (Case(40, seq_kv=90, block=16, head_dim=72, q_heads=4, kv_heads=1), 3, False),
    (Case(48, block=16, head_dim=32, q_heads=4, kv_heads=1, mask="empty_rows", dtype="bfloat16",
          causal=False), 4, False),
    (Case(40, block=16, head_dim=32, q_heads=16, kv_heads=1, lse=True), 3, False),
    (Case(50, block=32, head_dim=32, q_heads=4, kv_heads=2, per_q_head=True, batch=2, lse=True), 2, True),
]


def make_token_inputs(rng, c: Case, max_blocks: int):
    """q, k, v and a token-level Selection of random blocks ([B, H, T, nK] mask, H = K or N)."""
    s = c.seq_kv or c.seq
    dt = jnp.dtype(c.dtype)
    q = jnp.asarray(1.5 * rng.standard_normal((c.batch, c.seq, c.q_heads, c.head_dim)), dt)
    k = jnp.asarray(rng.standard_normal((c.batch, s, c.kv_heads, c.head_dim)), dt)
    v = jnp.asarray(rng.standard_normal((c.batch, s, c.kv_heads, c.head_dim)), dt)
    shape = (c.batch, c.q_heads if c.per_q_head else c.kv_heads, c.seq, -(-s // c.block))
    mask = rng.random(shape) < 0.4
    if c.mask == "empty_rows":
        mask &= rng.random(shape[:3] + (1,)) < 0.6
    return q, k, v, ops.Selection.from_mask(jnp.asarray(mask), max_blocks, granularity="token")


def token_naive(sel, c: Case, same_doc=None):
    """Plain attention in the inputs' dtype over the keys of each token's blocks (the baseline)."""
    s = c.seq_kv or c.seq
    keys = jnp.repeat(sel.to_mask(), c.block, axis=3)[..., :s]
    per_key = dataclasses.replace(c, block=1)  # the mask is already per (token, key)
    return lambda *a: naive_attention(*a, keys, per_key, c.head_dim ** -0.5, same_doc)


# Key-block-outer: G = 3 (no power of two), lists per query head (G = 1), documents with lse, bf16
# with empty rows, S > T with D padded; 16-row chunks, 2 a program, so blocks span programs.
GATHER_INTERPRET_CASES = [
    (Case(66, block=16, head_dim=32, q_heads=6, kv_heads=2, lse=True), 3, True),
    (Case(50, block=16, head_dim=32, q_heads=4, kv_heads=2, per_q_head=True, batch=2), 2, False),
    (Case(48, block=16, head_dim=32, q_heads=4, kv_heads=1, mask="empty_rows", dtype="bfloat16"), 4, False),
    (Case(40, seq_kv=90, block=16, head_dim=72, q_heads=2, kv_heads=1, causal=False), 3, False),
]
QUERY = kernel.Tuning(token_order="query")
KEY_SMALL = kernel.Tuning(token_order="key", gather_rows=16, gather_chunks=2)


class _TokenTests:
    INTERPRET = True
    CASES = CASES
    TUNING = QUERY

    def pytest_generate_tests(self, metafunc):
        if metafunc.function.__name__ == "test_matches_reference":
            metafunc.parametrize("c, max_blocks, docs", self.CASES, ids=lambda x: str(x))

    def test_matches_reference(self, c: Case, max_blocks: int, docs: bool, request):
        gs = 1 if c.per_q_head else c.q_heads // c.kv_heads
        if self.TUNING.token_order == "query" and gs & (gs - 1):
            pytest.skip("the query-outer kernel tiles power-of-two groups only")
        rng = seeded_rng(request)
        q, k, v, sel = make_token_inputs(rng, c, max_blocks)
        seg, same_doc = segment_inputs(rng, c, "packed") if docs else (None, None)
        kw = dict(causal=c.causal, block_size=c.block, return_lse=True, segment_ids=seg)
        with kernel.tuning(self.TUNING):
            check_against_reference(
                c, rng, q, k, v,
                lambda *a: kernel.block_sparse_attention(*a, sel, interpret=self.INTERPRET, **kw),
                lambda *a: reference.block_sparse_attention(*a, sel, **kw),
                token_naive(sel, c, same_doc))

    def test_tile_lists_copied_to_every_token_match_the_tile_kernel(self, request):
        """A token selection that gives each token its tile's list computes what the tile one does."""
        rng = seeded_rng(request)
        c = Case(72, block=16, head_dim=32, q_heads=4, kv_heads=1)
        q, k, v, _ = make_token_inputs(rng, c, 2)
        tiles = jnp.asarray(rng.random((1, 1, 5, 5)) < 0.5)
        per_token = ops.Selection.from_mask(jnp.repeat(tiles, 16, axis=2)[:, :, :72], granularity="token")
        with kernel.poison_outputs(), kernel.tuning(self.TUNING):
            got = kernel.block_sparse_attention(q, k, v, per_token, block_size=16, interpret=self.INTERPRET)
        with kernel.poison_outputs():
            want = kernel.block_sparse_attention(q, k, v, tiles, block_size=16, interpret=self.INTERPRET)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


class TestTokenInterpret(_TokenTests):
    INTERPRET = True
    CASES = INTERPRET_CASES


class TestTokenGatherInterpret(_TokenTests):
    INTERPRET = True
    CASES = GATHER_INTERPRET_CASES
    TUNING = KEY_SMALL


class TestTokenCompiled(_TokenTests):
    INTERPRET = False
    pytestmark = GPU_ONLY


class TestTokenGatherCompiled(_TokenTests):
    INTERPRET = False
    TUNING = kernel.Tuning(token_order="key")   # the default 64-row chunks, 4 a program
    pytestmark = GPU_ONLY


class TestTokenGatherSmallChunksCompiled(_TokenTests):
    INTERPRET = False
    TUNING = KEY_SMALL
    pytestmark = GPU_ONLY


def test_selection_round_trip_and_pytree():
    mask = jnp.asarray(np.random.default_rng(0).random((1, 2, 9, 4)) < 0.5)
    sel = ops.Selection.from_mask(mask, granularity="token")
    assert sel.granularity == "token" and sel.indices.shape == (1, 2, 9, 4)
    np.testing.assert_array_equal(np.asarray(sel.to_mask()), np.asarray(mask))
    through_jit = jax.jit(lambda s: s)(sel)
    assert through_jit.granularity == "token"
    with pytest.raises(ValueError, match="granularity='row'"):
        ops.Selection(sel.indices, sel.counts, 4, granularity="row")


def _selection(indices, counts, num_blocks=4):
    return ops.Selection(jnp.asarray(indices), jnp.asarray(counts), num_blocks, granularity="token")


GOOD = np.tile(np.array([0, 1, -1], np.int32), (1, 1, 64, 1))
COUNTS = np.full((1, 1, 64), 2, np.int32)


@pytest.mark.parametrize("change, match", [
    (dict(sel=_selection(GOOD.astype(np.int16), COUNTS)), "selection.indices must be int32"),
    (dict(sel=_selection(np.where(GOOD == 1, 4, GOOD), COUNTS)), r"must lie in \[0, num_blocks=4\)"),
    (dict(sel=_selection(np.where(GOOD >= 0, 1 - GOOD, GOOD), COUNTS)), "strictly ascending"),  # [1, 0]
    (dict(sel=_selection(np.where(GOOD == 1, 0, GOOD), COUNTS)), "strictly ascending"),
    (dict(sel=_selection(GOOD, COUNTS + 2)), r"selection.counts must lie in \[0, max_blocks=3\]"),
    (dict(sel=_selection(GOOD[:, :, :32], COUNTS[:, :, :32])), r"selection.indices must have shape"),
    (dict(sel=_selection(np.repeat(GOOD, 3, axis=1), np.repeat(COUNTS, 3, axis=1))),
     r"heads=1 \(kv\) or 2 \(q\)"),
    (dict(block=48), "block_size=48"),
    (dict(head_dim=512, impl="pallas"), "head_dim=512 exceeds"),
])
def test_bad_token_selections_raise_value_error(change, match):
    g = dict(sel=_selection(GOOD, COUNTS), block=16, head_dim=32, q_heads=2, impl="xla") | change
    q = jnp.zeros((1, 64, g["q_heads"], g["head_dim"]), jnp.float32)
    k = jnp.zeros((1, 64, 1, g["head_dim"]), jnp.float32)
    with pytest.raises(ValueError, match=match):
        ops.block_sparse_attention(q, k, k, g["sel"], block_size=g["block"], impl=g["impl"], interpret=True)


def test_query_order_names_its_power_of_two_groups_and_bad_orders_are_named():
    """G = 3 runs in key-block-outer order ("auto" picks it); the query-outer order refuses it."""
    q = jnp.zeros((1, 64, 3, 32), jnp.float32)
    k = jnp.zeros((1, 64, 1, 32), jnp.float32)
    sel = _selection(GOOD, COUNTS)
    with kernel.tuning(QUERY), pytest.raises(ValueError, match="must be a power of two"):
        kernel.block_sparse_attention(q, k, k, sel, block_size=16, interpret=True)
    with kernel.tuning(kernel.Tuning(token_order="rows")), pytest.raises(ValueError, match="token_order='rows'"):
        kernel.block_sparse_attention(q, k, k, sel, block_size=16, interpret=True)


def test_tpu_kernel_names_missing_token_support():
    q = jnp.zeros((1, 128, 1, 128), jnp.float32)
    sel = ops.Selection.from_mask(jnp.ones((1, 1, 128, 1), bool), granularity="token")
    with pytest.raises(NotImplementedError, match="token-level"):
        tpu.block_sparse_attention(q, q, q, sel, block_size=128)
