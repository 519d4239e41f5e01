"""The pure train step: accumulation, auxiliary losses, parameter groups, z-loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain.attention import dispatch, report_aux_loss, spec as spec_lib
from sparsetrain.attention.dense import DenseAttention
from sparsetrain.configbase import apply_overrides
from sparsetrain.train.model_state import ModelDef, flatten
from sparsetrain.train.optimizer import learning_rate_schedule, make_optimizer
from sparsetrain.train.step import accumulate_gradients, make_train_step, token_losses
from tests.train.helpers import small_config


def batch(seed, b=4, t=32, vocab=320):
    tokens = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, 256)
    mask = (jax.random.uniform(jax.random.key(seed + 1), (b, t)) > 0.2).astype(jnp.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}


def one_step(cfg, data, seed=0):
    model = ModelDef.create(cfg.model)
    params = model.init(seed)
    optimizer = make_optimizer(cfg.optimizer, params, cfg.trainer.steps)
    step = jax.jit(make_train_step(model, optimizer, cfg.trainer,
                                   learning_rate_schedule(cfg.optimizer, cfg.trainer.steps)))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    return params, *step(state, data)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    cfg = small_config(tmp_path, "model.dtype=float32", "data.batch_size=4")
    model = ModelDef.create(cfg.model)
    params, data = model.init(0), batch(0)
    with jax.default_matmul_precision("highest"):
        full = accumulate_gradients(params, data, model, cfg.trainer)
        accum = accumulate_gradients(params, data, model,
                                     dataclasses.replace(cfg.trainer, grad_accum=4))
    np.testing.assert_allclose(full[1], accum[1], rtol=1e-6)       # loss
    assert float(full[2]) == float(accum[2]) == float(data["loss_mask"].sum())
    for k, g in flatten(full[0]).items():
        np.testing.assert_allclose(g, flatten(accum[0])[k], rtol=1e-4, atol=1e-8, err_msg=k)


class ProbeAttention(DenseAttention):
    """Dense attention that reports mean(q^2) as an auxiliary loss named "probe"."""

    def __call__(self, q, k, v, **kwargs):
        report_aux_loss(self, "probe", jnp.mean(jnp.square(q.astype(jnp.float32))))
        return super().__call__(q, k, v, **kwargs)


@pytest.fixture
def probe_method(monkeypatch):
    monkeypatch.setitem(spec_lib.METHODS, "probe", ("auto", "xla"))
    monkeypatch.setitem(dispatch._METHOD_CLASSES, "probe", ProbeAttention)


@pytest.mark.parametrize("scan", ["false", "true"])
def test_aux_losses_are_weighted_summed_and_logged(tmp_path, probe_method, scan):
    cfg = small_config(tmp_path, "model.dtype=float32", "model.attention.0.method=probe",
                       "optimizer.warmup_steps=0", f"model.scan_layers={scan}")
    data = batch(1)
    params, plain, metrics = one_step(apply_overrides(cfg, ["trainer.aux_loss_weights=probe=0"]), data)
    _, weighted, metrics_w = one_step(apply_overrides(cfg, ["trainer.aux_loss_weights=probe=100"]), data)
    model = ModelDef.create(cfg.model)
    _, aux = model.apply(params, data["inputs"], data["positions"], data["segment_ids"])
    assert aux["probe"].shape == ()
    np.testing.assert_allclose(metrics["aux/probe"], aux["probe"], rtol=1e-5)  # mean over layers
    np.testing.assert_allclose(metrics["loss"], metrics_w["loss"], rtol=1e-6)  # "loss" is the LM loss
    assert metrics_w["grad_norm"] > metrics["grad_norm"]  # the weighted aux loss reached the gradient
    key = "layers/attn/q_proj" if scan == "true" else "layers/0/attn/q_proj"
    assert not np.allclose(flatten(plain["params"])[key], flatten(weighted["params"])[key])


def test_lr_multiplier_zero_keeps_a_group_fixed(tmp_path):
    cfg = small_config(tmp_path, "optimizer.lr_multipliers=lm_head=0,layers/1/=2", "optimizer.warmup_steps=0")
    params, state, _ = one_step(cfg, batch(2))
    after = flatten(state["params"])
    np.testing.assert_array_equal(after["lm_head"], flatten(params)["lm_head"])
    assert not np.array_equal(after["layers/1/mlp/up_proj"], flatten(params)["layers/1/mlp/up_proj"])


def test_z_loss_adds_squared_log_normaliser():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7)) * 3
    targets = jnp.array([[0, 1, 2], [3, 4, 5]])
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(token_losses(logits, targets, 0.1) - token_losses(logits, targets, 0.0),
                               0.1 * lse ** 2, rtol=1e-5)
