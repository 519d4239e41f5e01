"""The pure train step: accumulation, auxiliary losses, parameter groups, z-loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain.attention import spec as spec_lib
from sparsetrain.config import OptimizerConfig
from sparsetrain.configbase import apply_overrides
from sparsetrain.attention.dense import DenseAttention
from sparsetrain.attention.method import AuxLoss, StepContext
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.train.cross_entropy import token_losses
from sparsetrain.train.optimizer import frozen_paths, learning_rate_schedule, make_optimizer
from sparsetrain.train.step import accumulate_gradients, make_train_step
from tests.tolerances import assert_close_to_scale
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
    frozen = frozen_paths(cfg.optimizer, cfg.model, params)
    optimizer = make_optimizer(cfg.optimizer, params, cfg.trainer.steps, frozen)
    step = jax.jit(make_train_step(model, optimizer, cfg.trainer,
                                   learning_rate_schedule(cfg.optimizer, cfg.trainer.steps),
                                   frozenset(flatten(params)) - frozen))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    return params, *step(state, data)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    cfg = small_config(tmp_path, "model.dtype=float32", "data.batch_size=4")
    model = ModelDef.create(cfg.model)
    params, data = model.init(0), batch(0)
    with jax.default_matmul_precision("highest"):
        everything = frozenset(flatten(params))
        full = accumulate_gradients(params, data, model, cfg.trainer, StepContext(), everything)
        accum = accumulate_gradients(params, data, model, dataclasses.replace(cfg.trainer, grad_accum=4),
                                     StepContext(), everything)
    np.testing.assert_allclose(full[1], accum[1], rtol=1e-6)       # loss
    assert float(full[2]) == float(accum[2]) == float(data["loss_mask"].sum())
    for k, g in flatten(full[0]).items():
        # float32 sums in another order (a fixed atol=1e-8 failed on some CPUs).
        assert_close_to_scale(flatten(accum[0])[k], g, rel=1e-4, err_msg=k)


class ProbeAttention(DenseAttention):
    """Dense attention that reports weight * mean(q^2) as a loss named "probe"."""

    def __init__(self, weight):
        super().__init__("xla")
        self.weight = weight

    def __call__(self, inp):
        self.sow(AuxLoss, "probe", self.weight * jnp.mean(jnp.square(inp.q.astype(jnp.float32))))
        return super().__call__(inp)


@dataclasses.dataclass(frozen=True)
class ProbeOptions(spec_lib.MethodOptions):
    method: str = "probe"
    weight: float = 1.0

    def build(self, **dims):
        return ProbeAttention(self.weight)

    def density(self, seq_len):
        return 1.0


@pytest.fixture
def probe_method(monkeypatch):
    monkeypatch.setitem(spec_lib.METHODS, "probe", f"{__name__}:ProbeOptions")


@pytest.mark.parametrize("scan", ["false", "true"])
def test_layer_losses_carry_their_option_weight_and_are_logged(tmp_path, probe_method, scan):
    cfg = small_config(tmp_path, "model.dtype=float32", "model.attention.0.method=probe",
                       "optimizer.warmup_steps=0", f"model.scan_layers={scan}")
    data = batch(1)
    params, plain, metrics = one_step(apply_overrides(cfg, ["model.attention.0.weight=0"]), data)
    _, weighted, metrics_w = one_step(apply_overrides(cfg, ["model.attention.0.weight=100"]), data)
    model = ModelDef.create(apply_overrides(cfg, ["model.attention.0.weight=100"]).model)
    _, losses, _ = model.apply(params, data["inputs"], data["positions"], data["segment_ids"])
    assert losses["probe"].shape == ()
    np.testing.assert_allclose(metrics_w["probe"], losses["probe"], rtol=1e-5)  # mean over layers
    assert float(metrics["probe"]) == 0.0
    np.testing.assert_allclose(metrics["loss"], metrics_w["loss"], rtol=1e-6)  # "loss" is the LM loss
    assert metrics_w["grad_norm"] > metrics["grad_norm"]  # the weighted loss reached the gradient
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


def test_warm_up_gives_the_first_step_a_learning_rate():
    schedule = learning_rate_schedule(OptimizerConfig(warmup_steps=4, learning_rate=1e-3), 100)
    # Step n uses schedule(n - 1): step 1 already trains, step 5 reaches the peak.
    np.testing.assert_allclose([float(schedule(n)) for n in range(5)], [2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6)
