"""config.json mapping, the method registry, and clear errors for inputs we cannot convert."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparsetrain.attention.spec import METHODS, DenseOptions, options_class
from sparsetrain.config import RopeConfig
from sparsetrain.export import export_params
from sparsetrain.export.hf_config import from_hf_config, rope_from_hf, to_hf_config
from sparsetrain.export.sparse_layers import sparse_config, specs_from_sparse_config
from sparsetrain.export.import_hf import import_hf, read_hf
from sparsetrain.export.pretrained import load_checkpoint
from tests.export.helpers import LOCAL_REST, random_params, save_run, tiny


def test_every_attention_method_has_an_export_with_a_torch_file():
    from sparsetrain.export.export import TORCH_DIR
    for name in METHODS:
        export = options_class(name).export
        assert export is not None, name
        assert export.torch_impl == "dense" or (TORCH_DIR / f"{export.torch_impl}.py").is_file(), name


def test_config_round_trip_and_transformers_5_keys():
    cfg = tiny(tie_embeddings=True)
    hf = to_hf_config(cfg, dtype="float32", eos_token_id=256, pad_token_id=257)
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0}
    assert (hf["rms_norm_eps"], hf["tie_word_embeddings"], hf["dtype"]) == (1e-6, True, "float32")
    assert "auto_map" not in hf and "sparse_attention" not in hf
    back = from_hf_config(hf, dtype="float32")
    assert back == tiny(tie_embeddings=True)


def test_sparse_config_names_the_remote_code_and_each_layer():
    cfg = tiny(attention=LOCAL_REST)
    block = sparse_config([DenseOptions(), *[LOCAL_REST[1]] * 2])
    hf = to_hf_config(cfg, dtype="float32", eos_token_id=None, pad_token_id=None, sparse_attention=block)
    assert hf["model_type"] == "sparse_llama"
    assert hf["auto_map"]["AutoModelForCausalLM"] == "modeling_sparse_llama.SparseLlamaForCausalLM"
    assert hf["sparse_attention"]["layers"][1] == {"method": "local", "torch_impl": "local", "block_size": 32,
                                                   "local_blocks": 2, "initial_blocks": 1}
    rules = specs_from_sparse_config(block, 3)
    assert [r.method for r in rules] == ["dense", "local", "local"]
    with pytest.raises(ValueError, match="format"):
        specs_from_sparse_config({**block, "format": 99}, 3)
    with pytest.raises(ValueError, match="3 entries for 4 layers"):
        specs_from_sparse_config(block, 4)
    broken = {**block, "layers": [block["layers"][0], {"method": "local"}, block["layers"][2]]}
    with pytest.raises(ValueError, match=r"layers.1 \(local\) lacks"):
        specs_from_sparse_config(broken, 3)


def test_rope_reads_transformers_4_and_5_keys_and_rejects_unsupported_scaling():
    assert rope_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}) == RopeConfig(theta=7.0)
    assert rope_from_hf({"rope_theta": 7.0, "rope_scaling": None}) == RopeConfig(theta=7.0)
    assert rope_from_hf({}) == RopeConfig(theta=10000.0)
    assert rope_from_hf({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}) == RopeConfig(
        theta=1e4, scaling="linear", factor=2.0)
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        rope_from_hf({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="mscale"):
        rope_from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "mscale": 0.7,
                                          "original_max_position_embeddings": 128}})


LLAMA_HF = to_hf_config(tiny(), dtype="bfloat16", eos_token_id=2, pad_token_id=None)


@pytest.mark.parametrize("change,message", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope'"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
])
def test_import_rejects_what_our_llama_cannot_represent(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config({**LLAMA_HF, **change})


def test_import_reports_missing_files_and_keys(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        read_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_HF))
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        read_hf(tmp_path)
    del_vocab = {k: v for k, v in LLAMA_HF.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match=r"lacks \['vocab_size'\]"):
        from_hf_config(del_vocab)


def test_export_errors_name_the_problem(tmp_path):
    cfg = tiny(num_layers=1)
    run_cfg, flat, _ = load_checkpoint(save_run(tmp_path, cfg, random_params(cfg)))
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_params(run_cfg, flat, tmp_path / "a", dtype="int8")
    with pytest.raises(ValueError, match="not empty"):
        export_params(run_cfg, flat, tmp_path, dtype="float32")
    with pytest.raises(ValueError, match="tokenizer 'missing.json'.*--tokenizer none"):
        export_params(run_cfg, flat, tmp_path / "b", tokenizer="missing.json")
    with pytest.raises(ValueError, match="multiple of model.num_heads"):
        to_hf_config(tiny(d_model=66), dtype="float32", eos_token_id=None, pad_token_id=None)
    out = export_params(run_cfg, flat, tmp_path / "c", tokenizer="none")
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None


def test_import_refuses_an_existing_checkpoint_and_a_wrong_tie(tmp_path):
    cfg = tiny(num_layers=1, tie_embeddings=True)
    run_cfg, flat, _ = load_checkpoint(save_run(tmp_path, cfg, random_params(cfg)))
    out = export_params(run_cfg, flat, tmp_path / "hf", dtype="float32")
    import_hf(out, tmp_path / "imported")
    with pytest.raises(ValueError, match="already exists"):
        import_hf(out, tmp_path / "imported")
    # A tied model that also stores lm_head: accepted when it is the embedding, refused otherwise.
    tensors = load_file(str(out / "model.safetensors"))
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, str(out / "model.safetensors"))
    assert np.array_equal(read_hf(out)[1]["embed"], flat["embed"])
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        read_hf(out)


@pytest.mark.parametrize("dtype,says", [("float32", "within 1e-4"), ("bfloat16", "--dtype float32 for exact parity")])
def test_export_message_names_its_dtype(tmp_path, capsys, dtype, says):
    from sparsetrain.export.__main__ import main
    run = save_run(tmp_path, tiny(num_layers=1), random_params(tiny(num_layers=1)))
    assert main([str(run), str(tmp_path / "hf"), "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert f"with {dtype} weights" in out and says in out
