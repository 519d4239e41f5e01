"""Exported folders loaded by transformers in the PyTorch-only environment match JAX."""

import json
import subprocess
import sys

import numpy as np

from sparsetrain.data import ByteTokenizer
from sparsetrain.export import export_checkpoint, export_params
from sparsetrain.export.layout import layout
from sparsetrain.export.mapping import to_hf
from sparsetrain.export.pretrained import load_checkpoint
from tests.export.helpers import LOCAL_REST, jax_outputs, random_params, save_run, tiny

# Max |difference| over the logit scale (max |logit|), float32 on both sides.
TOLERANCE = 1e-4
SEQ = 320   # > 256, and not a multiple of the 32-token blocks (a ragged last block)


def check_parity(result: dict, expected_class: str) -> None:
    assert result["class"] == expected_class
    assert result["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                      "error_msgs": []}
    assert result["config_diff"] == {}
    assert result["eos_token_id"] == ByteTokenizer.eos_id
    # Per-layer first, so that a failure names the first layer that drifts.
    for i, (diff, scale) in enumerate(zip(result["hidden_max_abs_diff"], result["hidden_scale"])):
        assert diff <= TOLERANCE * scale, f"hidden state {i}: max abs diff {diff} (scale {scale})"
    assert result["logits_max_abs_diff"] <= TOLERANCE * result["logits_scale"]
    assert result["cached_decode_max_abs_diff"] <= TOLERANCE * result["logits_scale"]
    hidden = [f"{d:.3g}/{s:.3g}" for d, s in zip(result["hidden_max_abs_diff"], result["hidden_scale"])]
    print(f"\n{expected_class}: max abs diff / scale: logits {result['logits_max_abs_diff']:.3g}/"
          f"{result['logits_scale']:.3g}, hidden states {hidden}, cached decode "
          f"{result['cached_decode_max_abs_diff']:.3g}")


def export_with_reference(tmp_path, cfg, *, cli: bool = False):
    params = random_params(cfg, seed=1)
    run = save_run(tmp_path, cfg, params)
    out = tmp_path / "hf"
    if cli:
        subprocess.run([sys.executable, "-m", "sparsetrain.export", str(run), str(out), "--dtype", "float32"],
                       check=True, capture_output=True)
    else:
        export_checkpoint(run, out, dtype="float32")
    tokens = np.random.default_rng(2).integers(0, ByteTokenizer.vocab_size, (2, SEQ))
    np.savez(out / "jax_outputs.npz", **jax_outputs(cfg, params, tokens))
    return out


def config_and_flat(tmp_path, cfg):
    run_cfg, flat, _ = load_checkpoint(save_run(tmp_path, cfg, random_params(cfg)))
    return run_cfg, flat


def test_dense_export_loads_in_plain_transformers_with_same_logits(tmp_path, run_torch):
    # Scanned layers and tied embeddings: the export unstacks the layers and drops lm_head.
    out = export_with_reference(tmp_path, tiny(scan_layers=True, tie_embeddings=True))
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    check_parity(run_torch("parity", out), "LlamaForCausalLM")


def test_sparse_export_loads_with_remote_code_with_same_logits(tmp_path, run_torch):
    out = export_with_reference(tmp_path, tiny(attention=LOCAL_REST), cli=True)
    check_parity(run_torch("parity", out), "SparseLlamaForCausalLM")


def test_sparse_loader_refuses_missing_and_extra_weights(tmp_path, run_torch):
    cfg = tiny(num_layers=2, attention=LOCAL_REST)
    out = export_params(*config_and_flat(tmp_path, cfg), tmp_path / "hf", dtype="float32")
    result = run_torch("sparse_refusals", out)
    assert "trust_remote_code=True" in result["without_remote_code"]
    assert result["class"] == "SparseLlamaForCausalLM" and not any(result["loading_info"].values())
    assert "unexpected ['model.layers.1.self_attn.attend.bogus']" in result["extra"]
    assert "missing ['model.layers.1.self_attn.attend.temperature']" in result["missing"]
    assert not any(result["with_parameter_loading_info"].values())
    assert result["with_parameter_value"] == [0.0, 1.0, 2.0, 3.0]


def test_bfloat16_export_is_torch_rounding_of_float32(tmp_path, run_torch):
    cfg = tiny(num_layers=2)
    run_cfg, flat = config_and_flat(tmp_path, cfg)
    out = export_params(run_cfg, flat, tmp_path / "hf")   # bfloat16 is the default
    np.savez(tmp_path / "f32.npz", **to_hf(flat, layout(cfg).entries))
    result = run_torch("bf16", out, tmp_path / "f32.npz")
    assert result["metadata"] == {"format": "pt"}
    assert result["dtypes"] == ["torch.bfloat16"] and result["mismatched"] == []
    assert result["model_dtype"] == "torch.bfloat16" and result["finite"]


def test_byte_tokenizer_loads_in_transformers_with_the_same_ids(tmp_path, run_torch):
    text = "héllo ✓\n\tdef f(x):\n    return x  # <tab>\x00"
    ByteTokenizer().save(tmp_path / "tok")
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")   # argv cannot carry the NUL byte
    result = run_torch("tokenizer", tmp_path / "tok", tmp_path / "text.txt")
    assert result["ids"] == ByteTokenizer().encode(text).tolist()
    assert result["decoded"] == text
    assert (result["eos"], result["pad"], result["bos"], result["size"]) == (256, 257, None, 258)
