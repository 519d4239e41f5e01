"""SeerAttention's intermediates against straightforward float64 references of the paper's math
(method notes §1.1-§1.3), selection rules and ties, and freezing in distill mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsetrain import ops
from sparsetrain.attention.method import AuxLoss, AuxMetric
from sparsetrain.attention.spec import method_options
from sparsetrain.checkpoint.model_def import flatten
from sparsetrain.configbase import ConfigError
from sparsetrain.sparse import seer
from sparsetrain.sparse.seer import SeerAttention, gate_logits, kl_loss, kl_target, select_blocks
from tests.sparse.helpers import inputs, layer, qkv

jax.config.update("jax_default_matmul_precision", "highest")


def np_rope(x, pos, theta=10000.0):
    """Half-split RoPE of x [..., n, E] at positions pos [n], float64."""
    e = x.shape[-1]
    inv = theta ** (-np.arange(0, e, 2) / e)
    ang = pos[:, None] * inv
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : e // 2], x[..., e // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference_gate(q, k, w_q, w_k, bs, query_pool):
    """§1.1 in numpy, one batch row and head at a time: pooled Q (avg), K (max|min|avg), linear,
    RoPE at block starts, scaled dot product, candidates j <= i (block) or j < i (lagged)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, h = q.shape
    group = n // k.shape[2]
    nb = -(-t // bs)
    e = w_q.shape[-1]
    out = np.full((b, n, nb, nb), -np.inf)
    for bi in range(b):
        for head in range(n):
            qp = np.stack([q[bi, i * bs:(i + 1) * bs, head].mean(0) for i in range(nb)])
            if query_pool == "lagged":
                qp = np.concatenate([np.zeros((1, h)), qp[:-1]])
            kh = k[bi, :, head // group]
            kp = np.stack([np.concatenate([kh[j * bs:(j + 1) * bs].max(0), kh[j * bs:(j + 1) * bs].min(0),
                                           kh[j * bs:(j + 1) * bs].mean(0)]) for j in range(nb)])
            starts = np.arange(nb) * bs
            qh = np_rope(qp @ np.asarray(w_q[head], np.float64), starts)
            kh_ = np_rope(kp @ np.asarray(w_k[head], np.float64), starts)
            s = qh @ kh_.T / np.sqrt(e)
            for i in range(nb):
                for j in range(nb):
                    if j < i or (j == i and query_pool == "block"):
                        out[bi, head, i, j] = s[i, j]
    return out


@pytest.mark.parametrize("query_pool", ["lagged", "block"])
@pytest.mark.parametrize("seq", [64, 75])   # a block multiple and a ragged last block
def test_gate_logits_match_the_paper_math(query_pool, seq):
    q, k, v = qkv(seq, seed=3)
    keys = jax.random.split(jax.random.key(4), 2)
    w_q = jax.random.normal(keys[0], (4, 16, 8)) * 0.3
    w_k = jax.random.normal(keys[1], (4, 48, 8)) * 0.3
    inp = inputs(q, k, v)
    got = gate_logits(q, k, inp.positions, w_q, w_k, block_size=16, query_pool=query_pool, rope=inp.rope)
    want = reference_gate(q, k, w_q, w_k, 16, query_pool)
    assert np.array_equal(np.isfinite(np.asarray(got)), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(got)[finite], want[finite], rtol=1e-4, atol=1e-5)


def reference_target(q, k, bs, query_pool):
    """§1.2 in float64 numpy: causal softmax map, 2-D max-pool per tile, row-normalise; then the
    gate's candidates only, renormalised."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, h = q.shape
    kk = np.repeat(k, n // k.shape[2], axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    nb = -(-t // bs)
    pooled = np.zeros((b, n, nb, nb))
    for i in range(nb):
        for j in range(nb):
            pooled[:, :, i, j] = p[:, :, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].max(axis=(2, 3))
    pooled /= pooled.sum(-1, keepdims=True)
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    pooled = np.where((j < i) if query_pool == "lagged" else (j <= i), pooled, 0.0)
    total = pooled.sum(-1, keepdims=True)
    return np.where(total > 0, pooled / np.where(total > 0, total, 1), 0.0)


@pytest.mark.parametrize("query_pool", ["lagged", "block"])
def test_kl_target_is_the_pooled_attention_map(query_pool):
    q, k, _ = qkv(75, seed=5)
    scores = ops.block_attention_scores(q, k, block_size=16, impl="xla")
    np.testing.assert_allclose(np.asarray(kl_target(scores, query_pool)), reference_target(q, k, 16, query_pool),
                               atol=1e-6)


def test_kl_loss_is_row_kl_without_the_first_quarter():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 8, 8))
    logits = np.where(np.tril(np.ones((8, 8)), -1) > 0, logits, -np.inf)
    target = np.where(np.isfinite(logits), rng.random((2, 3, 8, 8)), 0.0)
    target[..., 1:, :] /= target[..., 1:, :].sum(-1, keepdims=True)
    got = kl_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(target, jnp.float32), 0.25)
    rows = []
    for i in range(2, 8):   # the first quarter (rows 0, 1) is left out; row 0 is empty anyway
        z = logits[..., i, :i]
        log_q = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        t = target[..., i, :i]
        rows.append(np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - log_q), 0), -1))
    np.testing.assert_allclose(float(got), np.mean(rows), rtol=1e-5)


def test_selection_rules_and_ties():
    # One row of 6 blocks (query block 5, all causal): logits with a tie between blocks 1 and 3.
    logits = jnp.asarray([[[[0.0, 2.0, 1.0, 2.0, 0.5, -jnp.inf]]]])   # the diagonal is not a candidate
    logits = jnp.broadcast_to(logits, (1, 1, 6, 6))
    row = lambda **kw: np.asarray(select_blocks(logits, method_options("seer", block_size=16, **kw), 96))[0, 0, 5]
    # top-3 counts the forced diagonal: 2 picks, the tie goes to the lower index.
    assert row(select="topk", topk=3).tolist() == [False, True, False, True, False, True]
    assert row(select="topk", topk=2).tolist() == [False, True, False, False, False, True]
    # Density 0.5 of 6 causal blocks = 3 blocks.
    assert row(select="density", target_density=0.5).tolist() == [False, True, False, True, False, True]
    probs = np.exp([0.0, 2.0, 1.0, 2.0, 0.5])
    probs /= probs.sum()
    kept = row(select="threshold", threshold=0.1)
    assert kept[:5].tolist() == (probs > 0.1).tolist() and kept[5]
    # Top-p 0.6: the two most probable (0.37 + 0.37 = 0.74 >= 0.6), plus the diagonal.
    assert row(select="topp", topp=0.6).tolist() == [False, True, False, True, False, True]
    assert row(select="topk", topk=3, initial_blocks=1).tolist() == [True, True, False, False, False, True]


def test_options_validate():
    for field, value in [("topk", 0), ("target_density", 0.0), ("topp", 1.5), ("kl_weight", 0.0),
                         ("d_gate", 7), ("mode", "fast"), ("select", "best")]:
        with pytest.raises(ConfigError, match=field):
            method_options("seer", **{field: value})
    with pytest.raises(ConfigError, match="sparse_kl"):
        method_options("seer", sparse_kl=True)   # only in sparse mode


def test_distill_output_is_dense_and_sparse_uses_the_selection():
    q, k, v = qkv(96, seed=7)
    inp = inputs(q, k, v)
    dense = layer(method_options("seer", block_size=16))(inp)
    sparse = layer(method_options("seer", block_size=16, mode="sparse", topk=2))(inp)
    from sparsetrain.attention.dense import dense_causal_attention
    np.testing.assert_allclose(np.asarray(dense), np.asarray(dense_causal_attention(inp.q, inp.k, v)),
                               atol=1e-5)
    assert not np.allclose(np.asarray(sparse), np.asarray(dense), atol=1e-3)


def test_distill_on_the_triton_kernel_fuses_output_and_scores(monkeypatch):
    """fused_scores with impl="pallas" (the Triton kernel, interpreted here): distill mode takes the
    dense output and the block scores from one `attention_with_block_scores` call, and its output,
    KL loss and metrics equal those of the XLA path (dense attention + two-pass scores). Without
    the option, or on XLA, the separate paths run."""
    q, k, v = qkv(75, seed=8)
    inp = inputs(q, k, v, segment_ids=jnp.asarray(np.repeat([[1] * 40 + [2] * 35], 2, 0)))
    results = {}
    for impl in ("xla", "pallas"):
        seer_layer = layer(method_options("seer", block_size=16, topk=2, impl=impl, fused_scores=True))
        assert not layer(method_options("seer", block_size=16, impl=impl)).fuses_scores()
        results[impl] = nnx.capture(seer_layer, AuxLoss, AuxMetric)(inp)
        assert seer_layer.fuses_scores() == (impl == "pallas")
        if impl == "xla":   # the fused run must reach neither of the separate paths
            monkeypatch.setattr(seer, "dense_causal_attention", None)
            monkeypatch.setattr(SeerAttention, "block_scores", None)
    (out_x, loss_x, metric_x), (out_p, loss_p, metric_p) = results["xla"], results["pallas"]
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_x), atol=2e-6)
    got = [nnx.to_pure_dict(state) for state in (loss_p, metric_p)]
    want = [nnx.to_pure_dict(state) for state in (loss_x, metric_x)]
    assert {"seer_kl", "recall", "kl"} <= set(want[0]) | set(want[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5), got, want)


def test_distill_freezes_everything_but_the_gates(tmp_path):
    from sparsetrain.train import Trainer
    from tests.train.helpers import small_config
    cfg = small_config(tmp_path, "trainer.steps=3", "trainer.eval_every=100", "model.dtype=float32",
                       "model.attention.0.method=seer", "model.attention.0.block_size=16")
    trainer = Trainer(cfg)
    before = {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}
    trainer.run()
    after = {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}
    gates = [k for k in before if "/attn/attend/" in k]
    assert sorted(gates) == ["layers/0/attn/attend/k_gate", "layers/0/attn/attend/q_gate",
                             "layers/1/attn/attend/k_gate", "layers/1/attn/attend/q_gate"]
    for key in before:
        if key in gates:
            assert not np.array_equal(before[key], after[key]), key
        else:
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)   # bit-identical
    # Adam moments exist for the gates only.
    moment_paths = {jax.tree_util.keystr(path) for path, leaf in
                    jax.tree_util.tree_flatten_with_path(trainer.state["opt_state"])[0] if leaf.ndim > 0}
    assert moment_paths and all("attend" in p for p in moment_paths), sorted(moment_paths)[:5]


def test_sparse_mode_from_the_command_line_trains_the_base_with_gates_frozen(tmp_path):
    from sparsetrain.train import Trainer
    from tests.train.helpers import read_metrics, small_config
    cfg = small_config(tmp_path, "trainer.steps=2", "trainer.eval_every=2", "model.dtype=float32",
                       "model.attention.0.method=seer", "model.attention.0.block_size=16",
                       "model.attention.0.mode=sparse", "model.attention.0.topk=2")
    trainer = Trainer(cfg)
    before = {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}
    summary = trainer.run()
    after = {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}
    for key in before:
        changed = not np.array_equal(before[key], after[key])
        assert changed == ("/attn/attend/" not in key), key   # gates get no gradient: frozen
    logged = read_metrics(tmp_path / cfg.name)[0]
    assert 0.0 < logged["density"] < 1.0 and "density/0" in logged and "seer_kl" not in logged
    assert 0.0 < summary["val/recall"] <= 1.0
