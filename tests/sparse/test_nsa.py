"""NSA against a straightforward reference of the method notes (§2.1, §2.3) with per-token
selection: compressed keys and values, the visibility rule, importance with the overlap mapping,
selected indices (ties included), each branch, and the gated sum with its gradients; each branch at
full budget equals dense attention; named option errors."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsetrain import ops
from sparsetrain.attention.dense import dense_causal_attention
from sparsetrain.attention.method import SparseMethod
from sparsetrain.attention.spec import method_options
from sparsetrain.configbase import ConfigError
from sparsetrain.sparse.nsa import parameter_shapes, select_blocks
from pallas_kernels.compressed_scores.common import Windows
from pallas_kernels.compressed_scores.reference import overlap_pool
from sparsetrain.sparse.nsa_compression import compress, compressed_attention
from tests.sparse.helpers import inputs, layer, qkv
from tests.tolerances import assert_close_to_scale

jax.config.update("jax_default_matmul_precision", "highest")

SMALL = dict(block_size=16, kernel_size=8, kernel_stride=4, topk=4, window=24, score_chunk=32,
             compressor_hidden=16)


def options(**changes):
    return method_options("nsa", **{**SMALL, **changes})


# ------------------------------------------------------------------------------------------------
# The reference, written from the definitions.

def reference_compress(x, kind, size, stride, weights):
    """[B, T, K, H] -> [B, I, K, H]: window i is tokens [i * stride, i * stride + size), each head
    flattened token-major and compressed with its own weights (all windows and heads at once)."""
    b, t, kv, h = x.shape
    n = max(0, (t - size) // stride + 1)
    win = x[:, np.arange(n)[:, None] * stride + np.arange(size)]                 # [B, I, size, K, H]
    if kind == "mean":
        return win.mean(2)
    if "position" in weights:
        win = win + jnp.transpose(weights["position"], (1, 0, 2))
    flat = jnp.moveaxis(win, 3, 2).reshape(b, n, kv, size * h)                   # [B, I, K, size*H]
    per_head = lambda a, w: jnp.einsum("BIKF,KFO->BIKO", a, w)
    if kind == "linear":
        return per_head(flat, weights["w"])
    return per_head(jax.nn.silu(per_head(flat, weights["w1"])), weights["w2"])


def overlap(i, j, o):
    """Stride-long segments shared by compressed token i and selection block j."""
    lo, hi = max(i * o.kernel_stride, j * o.block_size), min(i * o.kernel_stride + o.kernel_size, (j + 1) * o.block_size)
    return max(0, hi - lo) // o.kernel_stride


def reference_selection(scores, o, doc_first=None):
    """bool [B, K, T, nK] from scores [B, K, T, nK] (numpy): per token the forced blocks (first
    `initial_blocks` and last `local_blocks` of the valid ones), then the best others by (score
    descending, index ascending) up to `topk`."""
    b, kv, t, n_k = scores.shape
    mask = np.zeros(scores.shape, bool)
    for bi, h, ti in np.ndindex(b, kv, t):
        first = 0 if doc_first is None else doc_first[bi, ti] // o.block_size
        valid = list(range(first, ti // o.block_size + 1))
        forced = set(valid[:o.initial_blocks]) | set(valid[-o.local_blocks:])
        rest = sorted((j for j in valid if j not in forced), key=lambda j: (-scores[bi, h, ti, j], j))
        for j in forced | set(rest[:max(0, o.topk - len(forced))]):
            mask[bi, h, ti, j] = True
    return mask


def softmax_rows(logits, allowed):
    """Softmax over allowed entries; rows with none give 0."""
    logits = jnp.where(allowed, logits, -jnp.inf)
    top = jnp.max(logits, -1, keepdims=True)
    e = jnp.where(allowed, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def attention(q, k, v, allowed):
    """q [B, T, N, H], k/v [B, S, K, H], allowed [B, K or N, T, S] -> [B, T, N, H]."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, 2), jnp.repeat(v, group, 2)
    allowed = jnp.repeat(allowed, q.shape[2] // allowed.shape[1], 1)
    probs = softmax_rows(jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(q.shape[-1]), allowed)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


def reference_layer(params, inp, o, chosen=None):
    """The gated output [B, T, N, H] and its parts, from the definitions. The selection (no
    gradient) is computed in numpy from concrete values, or given as `chosen` [B, K, T, nK] when
    differentiating."""
    b, t, n, h = inp.q.shape
    kv = inp.k.shape[2]
    x, pos = inp.x, inp.positions
    proj = lambda name: jnp.einsum("BTD,DKH->BTKH", x, params[name])
    k_cmp, v_cmp = (proj("k_cmp_proj"), proj("v_cmp_proj")) if o.separate_kv else (inp.k_nope, inp.v)
    k_win, v_win = (inp.rope(proj("k_win_proj"), pos), proj("v_win_proj")) if o.separate_kv else (inp.k, inp.v)
    phi = lambda kv_name: {name[len(kv_name) + 5:]: value for name, value in params.items()
                           if name.startswith(f"{kv_name}_phi_")}
    kc = reference_compress(k_cmp, o.compressor, o.kernel_size, o.kernel_stride, phi("k"))
    vc = reference_compress(v_cmp, o.compressor, o.kernel_size, o.kernel_stride, phi("v"))
    starts = np.arange(kc.shape[1]) * o.kernel_stride
    kc = inp.rope(kc, pos[:, starts])
    rows = np.arange(t)
    visible = starts[None, :] + o.kernel_size - 1 <= rows[:, None]                 # [T, I]
    group = n // kv
    logits = jnp.einsum("BTNH,BINH->BNTI", inp.q, jnp.repeat(kc, group, 2)) / math.sqrt(h)
    probs = softmax_rows(logits, jnp.asarray(visible)[None, None])
    compressed = jnp.einsum("BNTI,BINH->BTNH", probs, jnp.repeat(vc, group, 2))
    n_k = -(-t // o.block_size)
    weight = np.array([[overlap(i, j, o) for j in range(n_k)] for i in range(kc.shape[1])]).reshape(-1, n_k)
    scores = None
    if chosen is None:
        p = np.asarray(probs, np.float64).reshape(b, kv, group, t, -1).sum(2)
        scores = np.einsum("BKTI,IJ->BKTJ", p, weight)
        chosen = reference_selection(scores, o)
    key_block = np.arange(t) // o.block_size
    causal = rows[None, :] <= rows[:, None]
    allowed_slc = np.take_along_axis(chosen, np.broadcast_to(key_block, (b, kv, t, t)), -1) & causal
    selected = attention(inp.q, inp.k, inp.v, jnp.asarray(allowed_slc))
    band = causal & (rows[None, :] > rows[:, None] - o.window)
    windowed = attention(inp.q, k_win, v_win, jnp.asarray(band)[None, None])
    gates = jax.nn.sigmoid(jnp.einsum("BTD,DNC->BTNC", x, params["gate"]))
    out = sum(gates[..., i, None] * part for i, part in enumerate((compressed, selected, windowed)))
    return out, dict(kc=kc, vc=vc, scores=scores, chosen=chosen, parts=(compressed, selected, windowed))


def pure_params(attn):
    return nnx.to_pure_dict(nnx.state(attn, nnx.Param))


def with_params(attn, params):
    graphdef, state = nnx.split(attn)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "linear", "mean"])
@pytest.mark.parametrize("seq", [8, 37, 64])
def test_compressed_keys_and_values_match_the_definition(kind, seq):
    o = options(compressor=kind)
    x = jax.random.normal(jax.random.key(seq), (2, seq, 2, 16))
    shapes = parameter_shapes(o, 4, 2, 16, 8)
    keys = iter(jax.random.split(jax.random.key(1), 8))
    weights = {name[len("k_phi_"):]: jax.random.normal(next(keys), shape) * 0.1
               for name, shape in shapes.items() if name.startswith("k_phi_")}
    assert ("position" in weights) == (kind != "mean")
    got = compress(x, kind, o.kernel_size, o.kernel_stride, weights)
    want = reference_compress(x, kind, o.kernel_size, o.kernel_stride, weights)
    assert got.shape == want.shape == (2, max(0, (seq - 8) // 4 + 1), 2, 16)
    assert_close_to_scale(got, want, 1e-6)


@pytest.mark.parametrize("size,stride,seq,docs", [(8, 4, 40, False), (8, 4, 37, True), (16, 4, 50, False),
                                                   (16, 16, 70, True), (4, 1, 23, False)])
def test_compressed_attention_is_softmax_over_the_windows_each_query_sees(size, stride, seq, docs):
    """The residue-split kernel calls equal a masked softmax over compressed tokens: token i is seen by
    query t iff its window has ended (i*stride + size - 1 <= t) and, packed, starts in t's document;
    rows that see none give 0 and LSE -inf. Gradients too."""
    q, k, v = qkv(seq, seed=seq)
    n_win = (seq - size) // stride + 1
    kc, vc = k[:, :n_win], v[:, :n_win]
    seg = jnp.asarray(np.where(np.arange(seq) >= 13, 1, 0)[None].repeat(2, 0)) if docs else None
    start = jnp.arange(n_win) * stride
    seen = start[None, :] + size - 1 <= jnp.arange(seq)[:, None]                         # [T, I]
    if docs:
        seen = seen[None] & (seg[:, start][:, None, :] == seg[:, :, None])              # [B, T, I]
    seen = jnp.broadcast_to(seen, (2, seq, n_win))[:, None]                               # [B, 1, T, I]

    def naive(q, kc, vc):
        logits = jnp.einsum("btnh,binh->bnti", q, jnp.repeat(kc, 2, axis=2)) * 0.25
        logits = jnp.where(seen, logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)
        p = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
        return jnp.einsum("bnti,binh->btnh", p, jnp.repeat(vc, 2, axis=2)), lse

    def ours(q, kc, vc):
        return compressed_attention(q, kc, vc, size=size, stride=stride, sm_scale=0.25, segment_ids=seg, impl="xla")

    cot = jax.random.normal(jax.random.key(7), q.shape)
    (o, lse), vjp = jax.vjp(ours, q, kc, vc)
    (o_want, lse_want), vjp_want = jax.vjp(naive, q, kc, vc)
    assert_close_to_scale(o, o_want, 1e-5)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), np.isfinite(np.asarray(lse_want)))
    np.testing.assert_allclose(np.asarray(jnp.where(jnp.isfinite(lse), lse, 0)),
                               np.asarray(jnp.where(jnp.isfinite(lse_want), lse_want, 0)), atol=1e-5)
    zero = jnp.zeros_like(lse)
    for got, want in zip(vjp((cot, zero)), vjp_want((cot, zero))):
        assert_close_to_scale(got, want, 1e-5)


@pytest.mark.parametrize("size,stride,block", [(8, 4, 16), (16, 4, 16), (4, 4, 16), (32, 16, 64), (16, 16, 16)])
def test_importance_overlap_mapping(size, stride, block):
    o = options(kernel_size=size, kernel_stride=stride, block_size=block)
    seq = 5 * block + 3
    n_win, n_k = (seq - size) // stride + 1, -(-seq // block)
    probs = jax.random.uniform(jax.random.key(0), (2, 3, n_win))
    got = overlap_pool(probs, n_k, Windows(block, size, stride, size, stride))
    weight = np.array([[overlap(i, j, o) for j in range(n_k)] for i in range(n_win)])
    np.testing.assert_allclose(np.asarray(got), np.asarray(probs) @ weight, rtol=1e-6)
    if size == block == stride:   # non-overlapping windows of one block: the identity (fla-org)
        np.testing.assert_allclose(np.asarray(got)[..., :n_win], np.asarray(probs), rtol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_selection_forces_sinks_and_local_blocks_and_breaks_ties_low(packed):
    o = options(topk=4)
    t, n_k = 100, 7
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, (2, 2, t, n_k)).astype(np.float32)     # many ties
    rows = jnp.arange(t)
    doc_first = np.where(np.arange(t) >= 40, 40, 0)[None].repeat(2, 0) if packed else None
    indices, counts = select_blocks(jnp.asarray(scores), rows, o, None if doc_first is None else jnp.asarray(doc_first))
    got = ops.indices_to_mask(indices, n_k, counts)
    np.testing.assert_array_equal(np.asarray(got), reference_selection(scores, o, doc_first))
    # Ascending lists, padding last.
    assert np.all(np.diff(np.where(np.asarray(indices) < 0, n_k, np.asarray(indices)), axis=-1) >= 0)


@pytest.mark.parametrize("seq", [64, 77])
@pytest.mark.parametrize("variant", [{}, {"compressor": "linear", "separate_kv": False},
                                     {"compressor": "mean", "kernel_size": 16, "kernel_stride": 16}])
def test_layer_matches_the_reference_forward_and_gradients(seq, variant):
    o = options(**variant)
    attn = layer(o)
    q, k, v = qkv(seq, seed=seq)
    params = jax.tree.map(lambda p: p * 10.0, pure_params(attn))   # gates and phi far from init
    cot = jax.random.normal(jax.random.key(5), q.shape)

    def loss(params, q, k, v, fn):
        out = fn(params, inputs(q, k, v))
        return jnp.sum(out * cot), out

    chosen = reference_layer(params, inputs(q, k, v), o)[1]["chosen"]
    ours = lambda params, inp: with_params(attn, params)(inp)
    ref = lambda params, inp: reference_layer(params, inp, o, chosen)[0]
    grad = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn=fn), argnums=(0, 1, 2, 3), has_aux=True))
    (_, got), got_grads = grad(ours)(params, q, k, v)
    (_, want), want_grads = grad(ref)(params, q, k, v)
    assert_close_to_scale(got, want, 1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
        w = want_grads
        for key in path:
            w = w[key.key] if hasattr(key, "key") else w[key.idx]
        assert_close_to_scale(g, w, 1e-4, err_msg=jax.tree_util.keystr(path))

    # Each branch and the selection on their own.
    model = with_params(attn, params)

    @jax.jit
    def selection_and_branches(q, k, v):
        inp = inputs(q, k, v)
        sel = model.select(inp)
        return sel.to_mask(), model.branches(inp, sel)

    mask, branches = selection_and_branches(q, k, v)
    _, parts = reference_layer(params, inputs(q, k, v), o)
    np.testing.assert_array_equal(np.asarray(mask), parts["chosen"])
    for name, got_part, want_part in zip(("compression", "selection", "window"), branches, parts["parts"]):
        assert_close_to_scale(got_part, want_part, 1e-5, err_msg=name)


@pytest.mark.parametrize("seq", [48, 77])
def test_selection_and_window_at_full_budget_equal_dense_attention(seq):
    attn = layer(options(topk=1 << 10, window=seq))
    q, k, v = qkv(seq, seed=2)
    inp = inputs(q, k, v)
    _, selected, _ = attn.branches(inp, attn.select(inp))
    dense = dense_causal_attention(inp.q, inp.k, inp.v)
    assert_close_to_scale(selected, dense, 1e-5)
    shared = layer(options(topk=1 << 10, window=seq, separate_kv=False))
    _, _, windowed = shared.branches(inp, shared.select(inp))
    assert_close_to_scale(windowed, dense, 1e-5)


def test_gates_get_gradients_and_selection_none():
    attn = layer(options())
    q, k, v = qkv(64, seed=3)
    params = pure_params(attn)
    grads = jax.grad(lambda p: jnp.sum(with_params(attn, p)(inputs(q, k, v)) ** 2))(params)
    for name in ("gate", "k_cmp_proj", "v_cmp_proj", "k_win_proj", "v_win_proj"):
        assert float(jnp.abs(grads[name]).max()) > 0, name
    assert float(jnp.abs(grads["k_phi_w1"]).max()) > 0
    assert SparseMethod.attend is not type(attn).attend   # sanity: NSA mixes its own branches


def test_options_validate():
    for field, value, message in [
        ("kernel_stride", 3, "kernel_stride=3: must divide kernel_size=8"),
        ("kernel_size", 32, "kernel_size=32: must be <= block_size=16"),
        ("topk", 2, "topk=2: must be >= initial_blocks \\+ local_blocks = 3"),
        ("compressor", "conv", "compressor='conv' is not allowed; choose one of 'mlp' | 'linear' | 'mean'"),
        ("window", 0, "window=0: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            options(**{field: value})
    with pytest.raises(ConfigError, match="kernel_stride=12: must divide block_size=16"):
        options(kernel_size=24, kernel_stride=12, block_size=16)


def test_density_counts_the_three_branches():
    o = method_options("nsa")
    assert o.density(512) > 1.0                   # short: the branches overlap
    t = 32768
    # Mean keys per token: 16 blocks of 64 + the window of 512 + t/16 compressed (mean t/2).
    expected = (16 * 64 + 512) / (t / 2) + 1 / 16
    assert abs(o.density(t) - expected) / expected < 0.05
    assert dataclasses.replace(o, topk=8).density(t) < o.density(t)


