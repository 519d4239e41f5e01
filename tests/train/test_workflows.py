"""The workflow configs (configs/_workflows.py, docs/workflows.md): every one validates and builds;
the tiny variants train on CPU on a narrower model, the short-to-long ones from the short dense run;
the trainer's evaluation suite writes its files at eval_every."""

import dataclasses
import json

import pytest

import configs
from sparsetrain.configbase import apply_overrides
from sparsetrain.train import train
from sparsetrain.train.loop import run_phases
from sparsetrain.checkpoint.model_def import ModelDef
from tests.train.helpers import read_metrics

WORKFLOWS = [name for name in configs.available() if name.startswith(("pretrain_", "long_"))]
# The tiny variants' lengths and attention rules on a narrower model: seconds per run.
FAST = ["model.d_model=64", "model.num_layers=2", "model.head_dim=16", "model.mlp_dim=128",
        "data.max_documents=120", "trainer.progress_bar=false", "tensorboard=false", "trainer.log_every=1",
        "trainer.eval_batches=1", "optimizer.warmup_steps=1"]


def fast(tmp_path, name, *overrides):
    return apply_overrides(configs.load(name), FAST + [f"run_dir={tmp_path}", *overrides])


def test_every_workflow_config_validates_and_builds():
    assert {"pretrain_dense", "pretrain_moba", "pretrain_infllm_v2", "pretrain_short_dense", "long_dense",
            "long_seer", "long_infllm_v2"} <= set(WORKFLOWS)
    for name in WORKFLOWS:
        cfg = configs.load(name)
        model = ModelDef.create(cfg.model)
        assert len(run_phases(cfg, model.abstract_params())) == len(cfg.trainer.phases) + 1, name
        if "tiny" not in name:
            # The token-level kernel tiles GQA groups of a power of two.
            group = cfg.model.num_heads // cfg.model.num_kv_heads
            assert group & (group - 1) == 0, name
    dense, moba, infllm = (configs.load(f"pretrain_{m}") for m in ("dense", "moba", "infllm_v2"))
    for other in (moba, infllm):   # only the attention differs
        assert dataclasses.replace(other, name=dense.name, model=dataclasses.replace(
            other.model, attention=dense.model.attention)) == dense


@pytest.mark.slow
def test_tiny_infllm_v2_pretraining_trains(tmp_path):
    # The other tiny pretraining runs train below: MoBA with the suite, dense as the short run.
    summary = train(fast(tmp_path, "pretrain_tiny_infllm_v2", "trainer.steps=2", "data.batch_size=4"))
    assert summary["step"] == 2 and summary["val/loss"] > 0 and 0 < summary["density"] < 1


def test_eval_suite_at_eval_every_writes_its_files(tmp_path):
    cfg = fast(tmp_path, "pretrain_tiny_moba", "trainer.steps=2", "trainer.eval_every=2", "data.batch_size=4",
               "trainer.eval_suite.enabled=true", "trainer.eval_suite.modes=sparse",
               "trainer.eval_suite.tasks=loss,passkey", "trainer.eval_suite.loss_tokens=256",
               "trainer.eval_suite.depths=1.0", "trainer.eval_suite.samples=1",
               "trainer.eval_suite.min_len=256", "trainer.eval_suite.max_len=256")
    train(cfg)
    out = tmp_path / "pretrain_tiny_moba" / "eval"
    assert [p.name for p in out.iterdir()] == ["step_2"]
    results = json.loads((out / "step_2" / "results.json").read_text())
    assert results["step"] == 2 and set(results["loss"]) == {"sparse"} and set(results["retrieval"]) == {"passkey"}
    assert set(results["loss"]["sparse"]) == {"256"} and set(results["retrieval"]["passkey"]["sparse"]["256"]) == {"1.0"}
    assert set(results["layers"]["256"]["density"]) == {"0"}   # layer 1 is dense
    for name in ("results.md", "loss_vs_length.png", "passkey.png", "layers.png", "selected_blocks.png",
                 "selection_map.npz"):
        assert (out / "step_2" / name).stat().st_size > 0, name


def compressed(cfg, steps):
    """The run with its phases moved to steps 1, 2, ... and `steps` steps."""
    phases = tuple(dataclasses.replace(p, start_step=i) for i, p in enumerate(cfg.trainer.phases, start=1))
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps=steps, phases=phases))


@pytest.mark.slow
def test_short_to_long_chain(tmp_path, capsys):
    # long_tiny_dense's curriculum is long_tiny_infllm_v2's with dense layers; Seer starts from the
    # short run here rather than from long_tiny_dense, to keep the test short.
    train(fast(tmp_path, "pretrain_tiny_short_dense", "trainer.steps=2"))
    short = tmp_path / "pretrain_tiny_short_dense"
    train(compressed(fast(tmp_path, "long_tiny_infllm_v2", f"checkpoint.init_from={short}"), steps=3))
    assert f"initialised from {short}" in capsys.readouterr().out
    logged = [m for m in read_metrics(tmp_path / "long_tiny_infllm_v2") if "loss" in m]
    assert [m["phase"] for m in logged] == [0, 1, 2]   # 128 -> 256 -> 512 tokens
    assert logged[0]["density"] == 1 and 0 < logged[2]["density"] < 1   # dense at 128, sparse above
    train(compressed(fast(tmp_path, "long_tiny_seer", f"checkpoint.init_from={short}"), steps=2))
    logged = [m for m in read_metrics(tmp_path / "long_tiny_seer") if "loss" in m]
    assert "seer_kl" in logged[0] and "seer_kl" not in logged[1]   # distill, then sparse
