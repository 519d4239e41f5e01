"""RoPE context-extension scalings: formulas, transformers' frequencies, config round trips, torch parity."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsetrain
from models.rope import apply_rope, inverse_frequencies, yarn_attention_factor, yarn_ramp_bounds
from sparsetrain.config import RopeConfig
from sparsetrain.configbase import ConfigError, from_dict, to_dict
from sparsetrain.export import export_checkpoint
from sparsetrain.export.hf_config import from_hf_config, rope_from_hf, to_hf_config
from sparsetrain.export.import_hf import import_hf, train_overrides
from tests.export.helpers import jax_outputs, save_run, tiny
from tests.export.test_torch_parity import SEQ, check_parity, export_with_reference
from tests.sparse.helpers import tiny as sparse_tiny
from tests.sparse.test_conformance import rule, with_method_params

H = 64
SCALINGS = {
    "linear": RopeConfig(theta=500.0, scaling="linear", factor=4.0),
    "ntk": RopeConfig(theta=500.0, scaling="ntk", factor=4.0),
    "yarn": RopeConfig(theta=500.0, scaling="yarn", factor=4.0, original_max_len=128),
    "yarn_custom": RopeConfig(theta=500.0, scaling="yarn", factor=3.0, original_max_len=100, beta_fast=16.0,
                              beta_slow=2.0, attention_factor=1.3),
    "llama3": RopeConfig(theta=500.0, scaling="llama3", factor=8.0, original_max_len=128, low_freq_factor=1.0,
                         high_freq_factor=4.0),
}


def freqs(cfg: RopeConfig, head_dim: int = H) -> np.ndarray:
    return np.asarray(inverse_frequencies(cfg, head_dim), np.float64)


@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn", "llama3"])
def test_scale_1_is_plain_rope(scaling):
    extra = {"original_max_len": 4096} if scaling in ("yarn", "llama3") else {}
    scaled = RopeConfig(scaling=scaling, factor=1.0, **extra)
    np.testing.assert_allclose(freqs(scaled), freqs(RopeConfig()), rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((1, 5, 2, H)).astype(np.float32)
    pos = jnp.arange(5)[None]
    np.testing.assert_allclose(apply_rope(x, pos, scaled), apply_rope(x, pos, RopeConfig()), rtol=1e-5, atol=1e-6)


def test_linear_and_ntk_formulas():
    plain = freqs(RopeConfig(theta=500.0))
    np.testing.assert_allclose(freqs(SCALINGS["linear"]), plain / 4, rtol=1e-6)
    ntk = freqs(SCALINGS["ntk"])
    # NTK-aware: the highest frequency kept, the lowest interpolated by exactly s.
    assert ntk[0] == 1.0
    np.testing.assert_allclose(ntk[-1], plain[-1] / 4, rtol=1e-5)
    np.testing.assert_allclose(ntk, (500.0 * 4 ** (H / (H - 2))) ** (-np.arange(0, H, 2) / H), rtol=1e-5)


def test_yarn_temperature_and_ramp_against_hand_computed_values():
    cfg = RopeConfig(theta=10000.0, scaling="yarn", factor=4.0, original_max_len=4096)
    assert yarn_attention_factor(cfg) == pytest.approx(0.1 * math.log(4) + 1)   # 1.1386
    assert yarn_attention_factor(dataclasses.replace(cfg, attention_factor=1.5)) == 1.5
    # Pair index with r rotations over 4096 tokens: 64 ln(4096 / (2 pi r)) / (2 ln 1e4):
    # r=32 -> 10.47, floored to 10; r=1 -> 22.50, ceiled to 23.
    assert yarn_ramp_bounds(cfg, H) == (10, 23)
    plain, got = freqs(RopeConfig()), freqs(cfg)
    np.testing.assert_allclose(got[:10], plain[:10], rtol=1e-6)           # extrapolated (kept)
    np.testing.assert_allclose(got[23:], plain[23:] / 4, rtol=1e-6)       # interpolated (/ s)
    ramp = (np.arange(10, 23) - 10) / 13
    np.testing.assert_allclose(got[10:23], plain[10:23] * (1 - ramp) + plain[10:23] / 4 * ramp, rtol=1e-5)
    # The temperature multiplies cos and sin: rotation keeps norms, so every vector grows by it.
    x = np.random.default_rng(0).standard_normal((1, 7, 2, H)).astype(np.float32)
    out = np.asarray(apply_rope(x, jnp.arange(7)[None] * 100, cfg))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.1386294 * np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_llama3_bands():
    cfg = SCALINGS["llama3"]
    plain, got = freqs(RopeConfig(theta=500.0)), freqs(cfg)
    wavelen = 2 * np.pi / plain
    high = wavelen < 128 / 4
    low = wavelen > 128 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(got[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(got[low], plain[low] / 8, rtol=1e-6)
    smooth = (128 / wavelen[~high & ~low] - 1) / 3
    mid = plain[~high & ~low]
    np.testing.assert_allclose(got[~high & ~low], (1 - smooth) * mid / 8 + smooth * mid, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"scaling": "dynamic"}, "scaling='dynamic' is not allowed; choose one of 'none' | 'linear'"),
    ({"factor": 2.0}, "factor=2.0: has no effect with scaling='none'"),
    ({"scaling": "linear", "factor": 0.5}, "factor=0.5: must be >= 1"),
    ({"scaling": "yarn", "factor": 2.0}, "original_max_len=0: must be > 0"),
    ({"scaling": "yarn", "factor": 2.0, "original_max_len": 64, "beta_fast": 1.0}, "beta_fast=1.0: must be > beta_slow"),
    ({"scaling": "llama3", "factor": 2.0, "original_max_len": 64, "high_freq_factor": 1.0},
     "high_freq_factor=1.0: must be > low_freq_factor"),
])
def test_bad_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        RopeConfig(**change)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_export_import_round_trip(name):
    cfg = tiny(rope=SCALINGS[name])
    hf = json.loads(json.dumps(to_hf_config(cfg, dtype="float32", eos_token_id=None, pad_token_id=None)))
    assert from_hf_config(hf).rope == cfg.rope
    assert from_dict(type(cfg.rope), to_dict(cfg.rope)) == cfg.rope
    # train.py is told the scaling fields that differ from their defaults.
    overrides = {o for o in train_overrides(cfg) if o.startswith("model.rope.")}
    assert {"model.rope.theta=500.0", f"model.rope.scaling={cfg.rope.scaling}", "model.rope.factor=" +
            str(cfg.rope.factor)} <= overrides
    assert ("model.rope.beta_fast=16.0" in overrides) == (name == "yarn_custom")


def test_import_reads_a_llama_3_1_config():
    hf = {"rope_theta": 500000.0, "max_position_embeddings": 131072,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert rope_from_hf(hf) == RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_len=8192)


def test_frequencies_match_transformers(tmp_path, run_torch):
    configs = {name: to_hf_config(tiny(rope=rope), dtype="float32", eos_token_id=None, pad_token_id=None)
               for name, rope in SCALINGS.items()}
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    theirs = run_torch("rope_frequencies", tmp_path / "configs.json")
    for name, rope in SCALINGS.items():
        ours = freqs(rope, tiny().head_dim)
        np.testing.assert_allclose(theirs[name]["inv_freq"], ours, rtol=2e-7, err_msg=name)
        expected_factor = yarn_attention_factor(rope) if rope.scaling == "yarn" else 1.0
        assert theirs[name]["attention_factor"] == pytest.approx(expected_factor, rel=1e-12), name


@pytest.mark.parametrize("name", list(SCALINGS))
def test_dense_torch_logits_parity(tmp_path, run_torch, name):
    out = export_with_reference(tmp_path, tiny(num_layers=2, rope=SCALINGS[name]))
    check_parity(run_torch("parity", out), "LlamaForCausalLM")


@pytest.mark.parametrize("name", ["yarn", "ntk"])
def test_seer_gate_rope_parity(tmp_path, run_torch, name):
    # The gate applies the model's scaling at its own width (d_gate 8 < head_dim 16).
    seer = dataclasses.replace(rule("seer", "sparse"), d_gate=8)
    cfg = dataclasses.replace(sparse_tiny(seer), max_seq_len=512, rope=SCALINGS[name])
    params = with_method_params(cfg, seed=1)
    out = export_checkpoint(save_run(tmp_path, cfg, params), tmp_path / "hf", dtype="float32")
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, SEQ))
    np.savez(out / "jax_outputs.npz", **jax_outputs(cfg, params, tokens))
    check_parity(run_torch("parity", out), "SparseLlamaForCausalLM")


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 128},
], ids=["llama3", "yarn"])
def test_scaled_transformers_llama_imports_with_the_same_logits(tmp_path, run_torch, rope_parameters):
    run_torch("make_llama", tmp_path, json.dumps(rope_parameters))
    import_hf(tmp_path / "f32", tmp_path / "imported")
    model, cfg = sparsetrain.load_pretrained(tmp_path / "imported", dtype="float32")
    assert cfg.model.rope.scaling == rope_parameters["rope_type"]
    ref = np.load(tmp_path / "torch_outputs.npz")
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(ref["tokens"]))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4 * np.abs(ref["logits"]).max()
