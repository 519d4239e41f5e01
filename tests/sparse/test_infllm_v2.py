"""InfLLM-V2's scoring and selection against straightforward float64 references of the method notes
(§3.1, per token), the dense-sparse switch (bit for bit dense below `dense_len`), the named errors,
and a measurement of the tile-level deviation (docs/sparse_methods.md quotes the numbers printed
here)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain.attention.spec import DenseOptions, method_options
from sparsetrain.checkpoint.model_def import ModelDef
from sparsetrain.configbase import ConfigError
from sparsetrain.sparse.infllm_v2 import lagged_tile_scores, select_blocks, token_scores
from tests.sparse.helpers import TINY, inputs, layer, qkv, tokens
from tests.sparse.planted import planted

jax.config.update("jax_default_matmul_precision", "highest")

SMALL = dict(block_size=16, kernel_size=8, kernel_stride=4, coarse_size=16, coarse_stride=8, topk=3,
             local_blocks=1, dense_len=0, score_chunk=32)


def options(**changes):
    return method_options("infllm_v2", **{**SMALL, **changes})


def windows(k, size, stride):
    """float64 [B, nW, K, H]: each complete window's mean, window by window."""
    n = max(0, (k.shape[1] - size) // stride + 1)
    return np.stack([k[:, c * stride:c * stride + size].mean(1) for c in range(n)], 1)


def reference_token_scores(q, k, o):
    """float64 [B, K, T, nK], from the definitions: per token t and query head h, lse over the
    coarse windows ended by t; per fine window c ended by t, exp(q.k1 * scale - lse) summed over the
    GQA group; per key block, the max over the fine windows overlapping it."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, h = q.shape
    kv, scale = k.shape[2], 1 / math.sqrt(h)
    k1, k2 = windows(k, o.kernel_size, o.kernel_stride), windows(k, o.coarse_size, o.coarse_stride)
    kv_of = np.arange(n) // (n // kv)
    pos = np.arange(t)
    s2 = np.einsum("btnh,bwnh->bntw", q, k2[:, :, kv_of]) * scale
    seen2 = np.arange(k2.shape[1]) * o.coarse_stride + o.coarse_size - 1 <= pos[:, None]
    with np.errstate(divide="ignore"):
        lse = np.log(np.where(seen2, np.exp(s2), 0.0).sum(-1))            # [B, N, T], -inf: none seen
    s1 = np.einsum("btnh,bwnh->bntw", q, k1[:, :, kv_of]) * scale
    seen1 = np.arange(k1.shape[1]) * o.kernel_stride + o.kernel_size - 1 <= pos[:, None]
    p = np.where(seen1 & np.isfinite(lse)[..., None], np.exp(s1 - np.where(np.isfinite(lse), lse, 0)[..., None]), 0)
    p = p.reshape(b, kv, n // kv, t, -1).sum(2)                          # [B, K, T, nW]
    n_k = -(-t // o.block_size)
    out = np.zeros((b, kv, t, n_k))
    for j in range(n_k):
        cs = [c for c in range(p.shape[-1]) if c * o.kernel_stride < (j + 1) * o.block_size
              and c * o.kernel_stride + o.kernel_size > j * o.block_size]
        if cs:
            out[..., j] = p[..., cs].max(-1)
    return out


def lagged_tiles(token_scores, bs):
    """[B, K, T, nK] -> [B, K, nQ, nK]: tile i gets the summed scores of tile i-1's tokens."""
    t = token_scores.shape[2]
    sums = np.stack([token_scores[:, :, i:i + bs].sum(2) for i in range(0, t, bs)], 2)
    return np.concatenate([np.zeros_like(sums[:, :, :1]), sums[:, :, :-1]], 2)


def reference_select(scores, rows_at, topk, initial, local, n_k, dense_below=None):
    """bool [..., R, nK]: per row r (a query block index rows_at[r]), blocks <= rows_at[r]; forced the
    first `initial` and the `local` ending at rows_at[r]; the best others to `topk` in all, ties to the
    lower index. Rows with rows_at[r] < dense_below keep every valid block."""
    j = np.arange(n_k)
    valid = j <= rows_at[:, None]
    forced = valid & ((j < initial) | (j > rows_at[:, None] - local))
    key = np.where(valid & ~forced, scores, -np.inf)
    order = np.argsort(-key, axis=-1, kind="stable")
    room = topk - forced.sum(-1, keepdims=True)
    take = (j < room) & np.isfinite(np.take_along_axis(key, order, -1))
    picked = np.zeros(key.shape, bool)
    np.put_along_axis(picked, order, take, -1)
    out = forced | picked
    if dense_below is not None:
        out |= valid & (rows_at < dense_below)[:, None]
    return out


@pytest.mark.parametrize("seq,kernel,coarse,chunk", [
    (128, (8, 4), (16, 8), 32), (100, (8, 4), (32, 16), 32), (75, (12, 4), (16, 8), 64), (64, (16, 16), (32, 16), 16)])
def test_token_and_tile_scores_match_the_per_token_definition(seq, kernel, coarse, chunk):
    o = options(kernel_size=kernel[0], kernel_stride=kernel[1], coarse_size=coarse[0], coarse_stride=coarse[1],
                score_chunk=chunk)
    q, k, _ = qkv(seq, seed=3)
    got = token_scores(q, k, o, 1 / math.sqrt(q.shape[-1]))
    want = reference_token_scores(q, k, o)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lagged_tile_scores(got, o.block_size)), lagged_tiles(want, o.block_size),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["token", "tile"])
@pytest.mark.parametrize("seq,dense_len", [(128, 0), (100, 32)])
def test_selection_forces_sinks_and_window_and_breaks_ties_low(seq, dense_len, granularity):
    o = options(topk=4, local_blocks=2, initial_blocks=1, dense_len=dense_len, granularity=granularity)
    n = -(-seq // 16)
    rows_at = np.arange(n) if granularity == "tile" else np.arange(seq) // 16
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, (2, 2, len(rows_at), n)).astype(np.float32)        # many ties
    got = np.asarray(select_blocks(jnp.asarray(scores), seq, o))
    want = reference_select(scores, rows_at, 4, 1, 2, n, dense_below=dense_len // 16)
    np.testing.assert_array_equal(got, want)
    sparse_rows = rows_at >= dense_len // 16
    assert (got.sum(-1)[..., sparse_rows] == np.minimum(4, rows_at[sparse_rows] + 1)).all()


def reference_output(q, k, v, mask, bs, granularity):
    """float64 attention of each token over the blocks selected for it (its tile's, or its own),
    shared per KV head, causal."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    group = n // k.shape[2]
    k, v = (np.repeat(x, group, axis=2) for x in (k, v))
    pos = np.arange(t)
    rows = pos // bs if granularity == "tile" else pos
    allowed = np.repeat(mask, group, axis=1)[:, :, rows][..., pos // bs] & (pos[None, :] <= pos[:, None])
    s = np.where(allowed, np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(h), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("granularity", ["token", "tile"])
@pytest.mark.parametrize("seq,dense_len", [(128, 0), (100, 48)])
def test_layer_attends_to_the_selected_blocks(seq, dense_len, granularity):
    o = options(dense_len=dense_len, granularity=granularity)
    q, k, v = qkv(seq, seed=5)
    inp = inputs(q, k, v)
    got = layer(o)(inp)
    n = -(-seq // 16)
    scores = reference_token_scores(inp.q, inp.k, o)
    rows_at = np.arange(seq) // 16
    if granularity == "tile":
        scores, rows_at = lagged_tiles(scores, 16), np.arange(n)
    mask = reference_select(scores, rows_at, o.topk, o.initial_blocks, o.local_blocks, n,
                            dense_below=dense_len // 16)
    np.testing.assert_allclose(np.asarray(got), reference_output(inp.q, inp.k, v, mask, 16, granularity),
                               atol=2e-5)


def models(rule, seq_cap=512):
    sparse = dataclasses.replace(TINY, max_seq_len=seq_cap, attention=(dataclasses.replace(rule, layers="all"),))
    dense = dataclasses.replace(sparse, attention=(DenseOptions(),))
    params = ModelDef.create(dense).init(0)    # InfLLM-V2 has no parameters of its own
    return ModelDef.create(sparse), ModelDef.create(dense), params


@pytest.mark.parametrize("seq", [100, 128])
def test_at_most_dense_len_tokens_is_the_dense_model_bit_for_bit(seq):
    sparse, dense, params = models(method_options("infllm_v2", block_size=16, dense_len=128))
    toks = jnp.asarray(tokens(seq, seed=7))
    got, _, metrics = jax.jit(sparse.apply)(params, toks)
    want, _, _ = jax.jit(dense.apply)(params, toks)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(metrics["density"]) == 1.0


def test_above_dense_len_the_first_positions_stay_dense_and_the_rest_goes_sparse():
    rule = options(dense_len=64)
    sparse, dense, params = models(rule)
    toks = jnp.asarray(tokens(160, seed=8))
    got, _, metrics = sparse.apply(params, toks)
    want, _, _ = dense.apply(params, toks)
    np.testing.assert_allclose(np.asarray(got[:, :64]), np.asarray(want[:, :64]), atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(got[:, 64:]), np.asarray(want[:, 64:]), atol=1e-3)
    # The selection always fills its budget, so the measured density is the static one (FLOP counts).
    assert float(metrics["density"]) == pytest.approx(rule.density(160), rel=1e-6) and rule.density(160) < 1.0
    assert rule.density(64) == 1.0


def test_options_validate():
    for fields, name in [({"kernel_size": 10}, "kernel_size"), ({"topk": 2, "initial_blocks": 1, "local_blocks": 2}, "topk"),
                         ({"granularity": "row"}, "granularity"), ({"kernel_size": 24}, "kernel_size"), ({"kernel_stride": 6, "kernel_size": 12}, "kernel_stride"),
                         ({"coarse_size": 20}, "coarse_size"), ({"topk": 0}, "topk"),
                         ({"dense_len": 40}, "dense_len"), ({"dense_len": -16}, "dense_len"),
                         ({"score_chunk": 24}, "score_chunk"), ({"kernel_stride": 0}, "kernel_stride")]:
        with pytest.raises(ConfigError, match=name):
            options(**fields)
    with pytest.raises(ConfigError, match="multiple of block_size=64"):
        method_options("infllm_v2", dense_len=100)


@pytest.mark.parametrize("segment", [24, 128])
def test_measured_deviation_of_tile_selection_from_per_token_selection(segment):
    """Measured on planted inputs (topic blocks of 32 keys), over the (token, KV head) rows that have
    a choice (more valid blocks than topk): the share whose block set differs from the paper's
    per-token selection, the share of the per-token choice's scored (not forced) blocks that the
    tile selection also holds, and, per query head with a planted relevant block, the share whose
    selection holds one (per-token too)."""
    seq, bs, topk, key_block = 2048, 16, 8, 32
    o = options(topk=topk, local_blocks=2, initial_blocks=1, coarse_size=32, coarse_stride=16, granularity="tile")
    q, k, relevant = planted(seq, key_block, segment=segment)
    token = reference_token_scores(q, k, o)                              # [B, K, T, nK]
    n_k, pos = seq // bs, np.arange(seq)
    exact = reference_select(token, pos // bs, topk, 1, 2, n_k)          # [B, K, T, nK]
    tiles = lagged_tile_scores(token_scores(jnp.asarray(q), jnp.asarray(k), o, 1 / math.sqrt(q.shape[-1])), bs)
    tiled = np.asarray(select_blocks(tiles, seq, o))[:, :, pos // bs]
    j = np.arange(n_k)
    forced = (j < 1) | (j > (pos // bs)[:, None] - 2)
    has_choice = pos // bs + 1 > topk
    differs = float((tiled != exact).any(-1)[..., has_choice].mean())
    scored = exact & ~forced
    kept = float((scored & tiled)[..., has_choice, :].sum() / scored[..., has_choice, :].sum())
    # Relevance per query head and topic block -> key blocks of 16, seen through the KV head's choice.
    group = q.shape[2] // k.shape[2]
    rel = np.repeat(relevant, key_block // bs, axis=-1)                  # [B, N, T, nK]
    findable = rel.any(-1) & has_choice
    hits = lambda sel: float((np.repeat(sel, group, axis=1) & rel).any(-1)[findable].mean())
    print(f"\nInfLLM-V2 tile selection vs per-token (T={seq}, query topic runs ~{segment}, tile {bs}, "
          f"topk {topk}): {differs:.3f} of (token, KV head) rows differ, {kept:.3f} of the per-token scored "
          f"blocks kept; finds a planted block for {hits(tiled):.3f} (per-token {hits(exact):.3f})")
    # Measured (seed 0): runs ~24: 0.944 differ, 0.388 kept, hits 0.664 vs 0.875 per token; runs ~128:
    # 0.912, 0.535, 0.854 vs 0.888. Fast-changing queries lose most: the case for per-token selection.
    assert kept > 0.3 and hits(tiled) > 0.6 and hits(exact) >= hits(tiled)
