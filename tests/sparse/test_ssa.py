"""SSA alignment as an option of any sparse method (method notes §5)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain.attention.alignment import alignment_loss, smooth_l1, use_full_output
from sparsetrain.attention.method import StepContext
from sparsetrain.attention.spec import method_options
from sparsetrain.checkpoint.model_def import ModelDef
from sparsetrain.configbase import ConfigError
from tests.sparse.helpers import tiny, tokens

jax.config.update("jax_default_matmul_precision", "highest")


def test_smooth_l1_is_pytorchs_default():
    a, b = jnp.array([0.0, 0.5, 3.0]), jnp.array([0.2, -0.5, 0.0])
    d = np.abs(np.asarray(a) - np.asarray(b))
    want = np.mean(np.where(d < 1, 0.5 * d ** 2, d - 0.5))
    np.testing.assert_allclose(float(smooth_l1(a, b)), want, rtol=1e-6)


def test_each_term_sends_gradient_to_its_own_side_only():
    full = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
    sparse = full + 0.3 * jax.random.normal(jax.random.key(1), full.shape)
    # d/d full comes only from SmoothL1(full, sg(sparse)); d/d sparse only from the other term.
    g_full, g_sparse = jax.grad(alignment_loss, argnums=(0, 1))(full, sparse)
    want_full = jax.grad(lambda f: smooth_l1(f, sparse))(full)
    want_sparse = jax.grad(lambda s: smooth_l1(full, s))(sparse)
    np.testing.assert_allclose(np.asarray(g_full), np.asarray(want_full), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_sparse), np.asarray(want_sparse), rtol=1e-6)
    assert float(alignment_loss(full, full)) == 0.0


def _apply(options, step, seed=0, train=True):
    cfg = tiny(options)
    model = ModelDef.create(cfg)
    ctx = StepContext(step=jnp.int32(step), train=train, rng=jax.random.fold_in(jax.random.key(seed), step))
    return model.apply(model.init(0), jnp.asarray(tokens(64)), ctx=ctx)


def test_loss_is_zero_when_sparse_equals_full():
    options = method_options("local", block_size=16, ssa=True).full_budget()
    _, losses, _ = _apply(options, step=0)
    assert float(losses["ssa"]) < 1e-12
    _, losses, _ = _apply(method_options("local", block_size=16, ssa=True), step=0)
    assert float(losses["ssa"]) > 1e-6   # a window of one block differs from full attention


def test_coin_is_shared_by_all_layers_and_reproducible_from_the_seed():
    options = method_options("local", block_size=16, ssa=True)
    coins = {}
    for step in range(8):
        _, _, metrics = _apply(options, step)
        per_layer = {float(metrics[f"ssa_full_output/{layer}"]) for layer in (1, 2)}
        assert len(per_layer) == 1   # the same flip in every layer
        coins[step] = per_layer.pop()
        assert coins[step] == float(use_full_output(jax.random.fold_in(jax.random.key(0), step)))
    assert set(coins.values()) == {0.0, 1.0}   # both outputs get used over 8 steps
    _, _, again = _apply(options, 3)
    assert float(again["ssa_full_output"]) == coins[3]


def test_the_chosen_output_feeds_the_model_and_evaluation_stays_sparse():
    options = method_options("local", block_size=16, ssa=True)
    plain = dataclasses.replace(options, ssa=False)
    full_step = next(s for s in range(8) if bool(use_full_output(jax.random.fold_in(jax.random.key(0), s))))
    sparse_step = next(s for s in range(8) if not bool(use_full_output(jax.random.fold_in(jax.random.key(0), s))))
    sparse_logits, _, _ = _apply(plain, 0)
    full_logits, _, _ = _apply(options.full_budget(), 0)
    np.testing.assert_allclose(np.asarray(_apply(options, sparse_step)[0]), np.asarray(sparse_logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(_apply(options, full_step)[0]), np.asarray(full_logits), atol=1e-5)
    logits, losses, metrics = _apply(options, full_step, train=False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(sparse_logits), atol=1e-5)
    assert "ssa" not in losses and "ssa_full_output" not in metrics


def test_weight_is_validated():
    with pytest.raises(ConfigError, match="ssa_weight"):
        method_options("local", ssa=True, ssa_weight=0.0)
