from sparsetrain.train import train
from tests.train.helpers import read_metrics, small_config


def test_loss_falls_on_the_embedded_corpus(tmp_path):
    cfg = small_config(tmp_path, "trainer.steps=60", "trainer.eval_every=60", "name=smoke",
                       "optimizer.learning_rate=3e-3")
    summary = train(cfg)
    losses = [m["loss"] for m in read_metrics(tmp_path / "smoke") if "loss" in m]
    assert len(losses) == 60
    # Bytes start near ln(320) = 5.8 nats; a working model learns the byte distribution of Python
    # source well below 3.5 within 60 steps.
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < 3.5, losses
    assert summary["val/loss"] < 3.6
    assert (tmp_path / "smoke" / "checkpoints" / "60").is_dir()
