import numpy as np
import pytest

from sparsetrain.train import Trainer, train
from sparsetrain.checkpoint import load_params
from sparsetrain.checkpoint.model_def import flatten
from sparsetrain.configbase import apply_overrides
from tests.train.helpers import small_config


def test_init_from_copies_weights_and_reports_new_parts(tmp_path, capsys):
    source_cfg = small_config(tmp_path, "trainer.steps=2", "name=source", "trainer.eval_every=1",
                              "checkpoint.keep_best=true")
    train(source_cfg)
    source, meta = load_params(tmp_path / "source")
    assert meta["step"] == 2
    best, best_meta = load_params(tmp_path / "source" / "best")
    assert best_meta["step"] in (1, 2) and "val/loss" in best_meta

    # A deeper model: layers 0-1 come from the source, layer 2 is new and must be reported; a
    # base weight starting fresh needs the explicit opt-in.
    cfg = small_config(tmp_path, "trainer.steps=1", "name=target", "model.num_layers=3",
                       f"checkpoint.init_from={tmp_path / 'source'}")
    with pytest.raises(ValueError, match=r"the source lacks \[.*'layers/2/attn/q_proj'"):
        Trainer(cfg)
    trainer = Trainer(apply_overrides(cfg, ["checkpoint.init_missing_ok=true"]))
    out = capsys.readouterr().out
    assert "initialised from" in out and "layers/2/attn/q_proj" in out
    params = flatten(trainer.state["params"])
    for key, value in flatten(source).items():
        np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(value), err_msg=key)
    assert int(trainer.state["step"]) == 0  # weights only: a new run starts at step 0
