"""Phase schedules: a Seer run that distills, then switches to sparse at a step, and a length
curriculum that switches to longer sequences and to sparse attention there; both resume in the
right phase and match an uninterrupted run."""

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


# 32 tokens dense, then 64 tokens with InfLLM-V2 sparse above position 32 (the switch made where
# the curriculum reaches the longer length).
CURRICULUM = ("model.dtype=float32", "data.seq_len=32", "optimizer.schedule=constant", "optimizer.warmup_steps=1",
              "trainer.eval_every=100", "checkpoint.every=2",
              'trainer.phases=[{start_step: 2, overrides: ["data.seq_len=64", "data.batch_size=2", '
              '"model.attention.0.method=infllm_v2", "model.attention.0.block_size=16", '
              '"model.attention.0.kernel_size=8", "model.attention.0.kernel_stride=4", '
              '"model.attention.0.coarse_size=16", "model.attention.0.coarse_stride=8", '
              '"model.attention.0.topk=2", "model.attention.0.dense_len=32", "model.attention.0.local_blocks=1"]}]')


@pytest.mark.slow
def test_a_length_curriculum_switches_data_and_attention_and_survives_a_resume(tmp_path):
    straight = Trainer(small_config(tmp_path, *CURRICULUM, "name=straight", "trainer.steps=5"))
    straight.run()
    logged = [m for m in read_metrics(tmp_path / "straight") if "loss" in m]
    assert [m["phase"] for m in logged] == [0, 0, 1, 1, 1]
    assert [m["tokens"] for m in logged] == [8 * 32] * 2 + [2 * 64] * 3
    assert "density" not in logged[1] and 0 < logged[2]["density"] < 1
    after = params(straight)

    Trainer(small_config(tmp_path, *CURRICULUM, "name=resumed", "trainer.steps=3")).run()
    resumed = Trainer(small_config(tmp_path, *CURRICULUM, "name=resumed", "trainer.steps=5"))
    assert resumed.phase_at(int(resumed.state["step"])) == 1 and resumed.data is resumed.data_for(1)
    resumed.run()
    final = params(resumed)
    for key in after:
        np.testing.assert_array_equal(final[key], after[key], err_msg=key)


def test_phases_are_validated(tmp_path):
    base = small_config(tmp_path, "model.attention.0.method=seer", "model.attention.0.block_size=16")
    with pytest.raises(ConfigError, match="start_step must increase"):
        apply_overrides(base, ['trainer.phases=[{start_step: 5, overrides: ["model.attention.0.mode=sparse"]}, '
                               '{start_step: 2, overrides: ["model.attention.0.topk=2"]}]'])
    with pytest.raises(ConfigError, match="model.. or data.seq_len/data.batch_size overrides"):
        apply_overrides(base, ['trainer.phases=[{start_step: 5, overrides: ["trainer.steps=3"]}]'])
    with pytest.raises(ConfigError, match="model.. or data.seq_len"):
        apply_overrides(base, ['trainer.phases=[{start_step: 5, overrides: ["data.source=x"]}]'])
    with pytest.raises(ConfigError, match="seq_len=128 exceeds model.max_seq_len=64"):
        Trainer(apply_overrides(base, ['trainer.phases=[{start_step: 2, overrides: ["data.seq_len=128"]}]']))
    bad = apply_overrides(base, ['trainer.phases=[{start_step: 2, overrides: ["model.mlp_dim=64"]}]'])
    with pytest.raises(ConfigError, match="change the model's parameters"):
        Trainer(bad)
