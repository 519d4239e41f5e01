"""A random transformers Llama, saved by transformers, imports with the same logits and fine-tunes."""

import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import sparsetrain
from sparsetrain.export.import_hf import import_hf, read_hf, train_overrides
from sparsetrain.train import Trainer
from sparsetrain.checkpoint.model_def import flatten
from tests.train.helpers import small_config

TOLERANCE = 1e-4   # max |difference| over max |logit|, float32


@pytest.fixture(scope="module")
def torch_llama(tmp_path_factory, run_torch):
    """Folders written by transformers: f32/ (one file) and bf16_sharded/ (bfloat16 shards + index).
    Read-only to the tests, so made once for all of them."""
    out = tmp_path_factory.mktemp("torch_llama")
    result = run_torch("make_llama", out)
    assert "model.safetensors.index.json" in result["bf16_files"]
    return out


def test_imported_transformers_llama_gives_the_same_logits(torch_llama, tmp_path):
    out = tmp_path / "imported"
    done = subprocess.run([sys.executable, "-m", "sparsetrain.export.import_hf", str(torch_llama / "f32"), str(out)],
                          capture_output=True, text=True, check=True)
    assert "--init_from" in done.stdout and "model.rope.theta=500.0" in done.stdout
    model, cfg = sparsetrain.load_pretrained(out, dtype="float32")
    assert (cfg.model.num_kv_heads, cfg.model.rms_eps, cfg.model.rope.theta) == (2, 1e-6, 500.0)
    ref = np.load(torch_llama / "torch_outputs.npz")
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(ref["tokens"]))
    diff, scale = np.abs(logits - ref["logits"]).max(), np.abs(ref["logits"]).max()
    print(f"\nimport: logits max abs diff {diff:.3g} at scale {scale:.3g}")
    assert diff <= TOLERANCE * scale


def test_sharded_bfloat16_folder_imports_exactly(torch_llama):
    cfg32, f32 = read_hf(torch_llama / "f32")
    cfg16, bf16 = read_hf(torch_llama / "bf16_sharded")
    assert cfg16.model == cfg32.model and bf16.keys() == f32.keys()
    for key, value in f32.items():
        assert bf16[key].dtype == np.float32   # widened exactly
        np.testing.assert_array_equal(bf16[key], value.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_import_is_accepted_by_init_from(torch_llama, tmp_path, capsys):
    out = tmp_path / "imported"
    cfg = import_hf(torch_llama / "f32", out)
    run = small_config(tmp_path, *train_overrides(cfg.model), "name=finetune",
                       f"checkpoint.init_from={out}")
    trainer = Trainer(run)
    assert "fresh: none; unused from source: none" in capsys.readouterr().out
    _, imported = read_hf(torch_llama / "f32")
    params = flatten(trainer.state["params"])
    assert all(np.array_equal(np.asarray(params[key]), value) for key, value in imported.items())
