"""Phase schedules: a Seer run that distills, then switches to sparse at a step, resumes in the right
phase and matches an uninterrupted run."""

import numpy as np
import pytest

from sparsetrain.checkpoint.model_def import flatten
from sparsetrain.configbase import ConfigError, apply_overrides
from sparsetrain.train import Trainer
from tests.train.helpers import read_metrics, small_config

SEER_THEN_SPARSE = ("model.dtype=float32", "model.attention.0.method=seer", "model.attention.0.block_size=16",
                    "model.attention.0.topk=2", "optimizer.schedule=constant", "optimizer.warmup_steps=1",
                    "trainer.eval_every=100", "checkpoint.every=2",
                    'trainer.phases=[{start_step: 3, overrides: ["model.attention.0.mode=sparse"]}]')


def params(trainer):
    return {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}


@pytest.mark.slow
def test_a_phase_switch_survives_a_resume(tmp_path):
    straight = Trainer(small_config(tmp_path, *SEER_THEN_SPARSE, "name=straight", "trainer.steps=6"))
    before = params(straight)
    straight.run()
    logged = [m for m in read_metrics(tmp_path / "straight") if "loss" in m]
    assert [m["phase"] for m in logged] == [0, 0, 0, 1, 1, 1]
    assert "seer_kl" in logged[2] and "seer_kl" not in logged[3]   # distill KL, then sparse
    after = params(straight)
    gate = "layers/0/attn/attend/q_gate"
    # Distill steps train only the gates; sparse steps only the base (gates frozen).
    assert not np.array_equal(before[gate], after[gate])
    assert not np.array_equal(before["layers/0/mlp/up_proj"], after["layers/0/mlp/up_proj"])

    Trainer(small_config(tmp_path, *SEER_THEN_SPARSE, "name=resumed", "trainer.steps=4")).run()
    resumed = Trainer(small_config(tmp_path, *SEER_THEN_SPARSE, "name=resumed", "trainer.steps=6"))
    assert resumed.phase_at(int(resumed.state["step"])) == 1
    resumed.run()
    final = params(resumed)
    for key in after:
        np.testing.assert_array_equal(final[key], after[key], err_msg=key)
    losses = [m["loss"] for m in read_metrics(tmp_path / "resumed") if "loss" in m]
    assert losses[-2:] == [m["loss"] for m in logged][-2:]


def test_phases_are_validated(tmp_path):
    base = small_config(tmp_path, "model.attention.0.method=seer", "model.attention.0.block_size=16")
    with pytest.raises(ConfigError, match="start_step must increase"):
        apply_overrides(base, ['trainer.phases=[{start_step: 5, overrides: ["model.attention.0.mode=sparse"]}, '
                               '{start_step: 2, overrides: ["model.attention.0.topk=2"]}]'])
    with pytest.raises(ConfigError, match="model.. overrides"):
        apply_overrides(base, ['trainer.phases=[{start_step: 5, overrides: ["trainer.steps=3"]}]'])
    bad = apply_overrides(base, ['trainer.phases=[{start_step: 2, overrides: ["model.mlp_dim=64"]}]'])
    with pytest.raises(ConfigError, match="change the model's parameters"):
        Trainer(bad)
