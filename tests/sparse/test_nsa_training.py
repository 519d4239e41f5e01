"""NSA trains from scratch from the CLI's config path: the tiny pretraining workflow
(configs/pretrain_tiny_nsa.py, on a narrower model for CPU) lowers the loss like the same run with
dense attention, and its config differs from the dense one only in attention."""

import dataclasses

import configs
from sparsetrain.configbase import apply_overrides
from sparsetrain.train import train
from tests.train.helpers import read_metrics

# 25 steps (40 before). Measured at 25 on seeds 0, 1, 2 (trainer.seed = data.seed): dense drops
# 1.75, 1.69, 1.72 (the test asks > 0.5); NSA's drop / dense's 1.004, 1.000, 1.004 (asks > 0.8);
# NSA's last loss / dense's 1.000, 1.002, 1.009 (asks < 1.05).
STEPS = 25
NARROW = ["model.d_model=64", "model.num_layers=2", "model.head_dim=16", "model.mlp_dim=128", "data.batch_size=4",
          "data.max_documents=200", "trainer.progress_bar=false", "tensorboard=false", "trainer.log_every=1",
          "trainer.eval_every=1000", "trainer.eval_batches=1", "optimizer.warmup_steps=5", f"trainer.steps={STEPS}"]


def losses(tmp_path, name):
    train(apply_overrides(configs.load(name), NARROW + [f"run_dir={tmp_path}"]))
    return [m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m]


def test_tiny_nsa_pretraining_lowers_the_loss_like_dense(tmp_path):
    nsa, dense = configs.load("pretrain_tiny_nsa"), configs.load("pretrain_tiny_dense")
    assert dataclasses.replace(nsa, name=dense.name, model=dataclasses.replace(
        nsa.model, attention=dense.model.attention)) == dense
    nsa_loss, dense_loss = losses(tmp_path, "pretrain_tiny_nsa"), losses(tmp_path, "pretrain_tiny_dense")
    first, last = lambda xs: sum(xs[:5]) / 5, lambda xs: sum(xs[-5:]) / 5
    dense_drop, nsa_drop = first(dense_loss) - last(dense_loss), first(nsa_loss) - last(nsa_loss)
    print(f"\nloss over {STEPS} steps, first 5 -> last 5: dense {first(dense_loss):.3f} -> {last(dense_loss):.3f}, "
          f"nsa {first(nsa_loss):.3f} -> {last(nsa_loss):.3f}")
    assert dense_drop > 0.5
    assert nsa_drop > 0.8 * dense_drop and last(nsa_loss) < 1.05 * last(dense_loss)
