"""Selection helpers against brute-force numpy: top-k, threshold, top-p, forced blocks, index lists."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain import ops
from tests.ops.helpers import seeded_rng


def causal_valid(n_q, n_k):
    return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + (n_k - n_q)


def brute_forced(valid_row, first, local):
    cols = np.flatnonzero(valid_row)
    return set(cols[:first]) | set(cols[len(cols) - local:] if local else [])


@pytest.mark.parametrize("n_q, n_k, k, first, local", [
    (8, 8, 3, 0, 1), (6, 10, 4, 1, 2), (8, 8, 20, 1, 1), (5, 5, 0, 1, 1), (7, 7, 2, 2, 2)])
def test_topk_matches_brute_force(n_q, n_k, k, first, local, request):
    rng = seeded_rng(request)
    # Few distinct values, so ties happen: they must go to the lower index.
    scores = rng.integers(0, 4, (2, 3, n_q, n_k)).astype(np.float32)
    scores[0, 0, -1, 0] = -np.inf
    got = np.asarray(ops.topk_block_mask(jnp.asarray(scores), k, force_first=first, force_local=local))
    valid = causal_valid(n_q, n_k)
    for idx in np.ndindex(2, 3, n_q):
        row, ok = scores[idx], valid[idx[-1]]
        forced = brute_forced(ok, first, local)
        budget = max(k - len(forced), 0)
        ranked = sorted((c for c in np.flatnonzero(ok) if c not in forced and row[c] > -np.inf),
                        key=lambda c: (-row[c], c))
        want = forced | set(ranked[:budget])
        assert set(np.flatnonzero(got[idx])) == want, (idx, row, ok)


def test_topk_rows_hold_min_k_and_visible_blocks():
    scores = jnp.asarray(np.random.default_rng(0).random((4, 16, 16)), jnp.float32)
    got = ops.topk_block_mask(scores, 5, force_first=1, force_local=1)
    counts = np.asarray(got.sum(-1))
    np.testing.assert_array_equal(counts, np.minimum(np.arange(16) + 1, 5)[None].repeat(4, 0))
    assert not np.asarray(got & ~causal_valid(16, 16)).any()
    assert np.asarray(got[..., 0]).all() and np.asarray(jnp.diagonal(got, axis1=-2, axis2=-1)).all()


def test_topk_with_explicit_valid_and_jit():
    valid = ops.causal_block_mask(200, 456, 64)  # ragged, seq_kv > seq
    scores = jnp.asarray(np.random.default_rng(1).random((1, 2) + valid.shape), jnp.float32)
    got = jax.jit(lambda s: ops.topk_block_mask(s, 3, force_local=2, valid=valid))(scores)
    assert not np.asarray(got & ~valid).any()
    last_two = np.asarray(valid)[:, ::-1].cumsum(1)[:, ::-1] <= 2
    assert np.asarray(got)[..., np.asarray(valid) & last_two].all()


def test_threshold_selection(request):
    rng = seeded_rng(request)
    scores = rng.random((3, 9, 9)).astype(np.float32)
    got = np.asarray(ops.threshold_block_mask(jnp.asarray(scores), 0.7, force_first=1))
    valid = causal_valid(9, 9)
    forced = np.asarray(ops.forced_block_mask(valid, force_first=1, force_local=1))
    np.testing.assert_array_equal(got, forced | (valid & (scores > 0.7)))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0])
def test_topp_matches_brute_force(p, request):
    rng = seeded_rng(request)
    n = 10
    valid = causal_valid(n, n)
    logits = np.where(valid, rng.standard_normal((2, n, n)) * 2, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    got = np.asarray(ops.topp_block_mask(jnp.asarray(probs, jnp.float32), p, force_first=1, force_local=1))
    for b, i in np.ndindex(2, n):
        forced = brute_forced(valid[i], 1, 1)
        order = list(forced) + sorted((c for c in np.flatnonzero(valid[i]) if c not in forced),
                                      key=lambda c: (-probs[b, i, c], c))
        mass, want = 0.0, set()
        for c in order:
            if mass >= p and c not in forced:
                break
            want.add(c)
            mass += probs[b, i, c]
        assert set(np.flatnonzero(got[b, i])) == want


def test_forced_blocks_follow_valid_blocks():
    valid = np.asarray(ops.causal_block_mask(100, 300, 16))  # rows start mid-sequence
    got = np.asarray(ops.forced_block_mask(valid, force_first=2, force_local=3))
    for i in range(valid.shape[0]):
        assert set(np.flatnonzero(got[i])) == brute_forced(valid[i], 2, 3)


def test_causal_block_mask_matches_element_mask():
    for t, s, bs in [(100, 300, 16), (250, 180, 32), (64, 64, 64), (1000, 1000, 64)]:
        elem = np.arange(s)[None, :] <= np.arange(t)[:, None] + s - t
        n_q, n_k = -(-t // bs), -(-s // bs)
        pad = np.zeros((n_q * bs, n_k * bs), bool)
        pad[:t, :s] = elem
        want = pad.reshape(n_q, bs, n_k, bs).any(axis=(1, 3))
        np.testing.assert_array_equal(np.asarray(ops.causal_block_mask(t, s, bs)), want)


def test_mask_index_round_trip_and_transpose(request):
    rng = seeded_rng(request)
    mask = rng.random((2, 3, 37, 41)) < 0.3
    idx, counts = ops.mask_to_indices(jnp.asarray(mask))
    idx, counts = np.asarray(idx), np.asarray(counts)
    for pos in np.ndindex(2, 3, 37):
        cols = np.flatnonzero(mask[pos])
        np.testing.assert_array_equal(idx[pos][:len(cols)], cols)
        assert (idx[pos][len(cols):] == -1).all() and counts[pos] == len(cols)
    np.testing.assert_array_equal(np.asarray(ops.indices_to_mask(idx, 41)), mask)
    t_idx, t_counts = ops.transposed_indices(jnp.asarray(mask))
    want_idx, want_counts = ops.mask_to_indices(jnp.asarray(mask.swapaxes(-1, -2)))
    np.testing.assert_array_equal(np.asarray(t_idx), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(t_counts), mask.sum(-2))
    short, short_counts = ops.mask_to_indices(jnp.asarray(mask), max_blocks=4)
    np.testing.assert_array_equal(np.asarray(short), idx[..., :4])
    np.testing.assert_array_equal(np.asarray(short_counts), np.minimum(counts, 4))


def test_transposed_lists_scale_to_long_context():
    """128k tokens at block 64: 2048 x 2048 blocks per head; linear-cost lists, exact on spot rows."""
    n = 2048
    rng = np.random.default_rng(0)
    mask = (rng.random((1, n, n)) < 0.05) & causal_valid(n, n)
    idx, counts = jax.jit(ops.transposed_indices)(jnp.asarray(mask))
    idx, counts = np.asarray(idx), np.asarray(counts)
    for j in (0, 1, 777, n - 1):
        rows = np.flatnonzero(mask[0, :, j])
        np.testing.assert_array_equal(idx[0, j, :len(rows)], rows)
        assert counts[0, j] == len(rows)
