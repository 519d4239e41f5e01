"""Export -> import is bit-exact, and the exported tensors have exactly the Llama names and layouts."""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from sparsetrain.export import export_params
from sparsetrain.export.layout import layout
from sparsetrain.export.mapping import LLAMA, expand, from_hf, stack_layers, to_hf, unstack_layers
from sparsetrain.export.safetensors_io import read_tensors
from sparsetrain.export.import_hf import read_hf
from sparsetrain.export.pretrained import load_checkpoint
from sparsetrain.checkpoint.model_def import flatten
from tests.export.helpers import LOCAL_REST, random_params, save_run, tiny

VARIANTS = {
    "plain": {},
    "scan_tied": {"scan_layers": True, "tie_embeddings": True},
    "local_layers": {"attention": LOCAL_REST},
}


def llama_layout(cfg) -> dict[str, tuple[int, ...]]:
    """The Hugging Face LlamaForCausalLM state dict, written out independently of mapping.LLAMA."""
    d, n, k, h, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (k * h, d),
                       p + "self_attn.v_proj.weight": (k * h, d), p + "self_attn.o_proj.weight": (d, n * h),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return shapes


def exported(tmp_path, cfg, *, arange=False, **kwargs):
    run_cfg, flat, _ = load_checkpoint(save_run(tmp_path, cfg, random_params(cfg, arange=arange)))
    return flat, export_params(run_cfg, flat, tmp_path / "hf", dtype="float32", **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arange", [False, True], ids=["random", "arange"])
def test_export_then_import_is_bit_exact(tmp_path, variant, arange):
    cfg = tiny(**VARIANTS[variant])
    flat, out = exported(tmp_path, cfg, arange=arange)
    imported_cfg, imported = read_hf(out)
    if cfg.scan_layers:
        imported = stack_layers(imported, cfg.num_layers)
    assert imported.keys() == flat.keys()
    for key, value in flat.items():
        assert imported[key].dtype == np.float32
        np.testing.assert_array_equal(imported[key], value, err_msg=key)
    arch = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "max_seq_len", "rms_eps", "tie_embeddings", "rope")
    assert all(getattr(imported_cfg.model, name) == getattr(cfg, name) for name in arch)
    assert per_layer_attention(imported_cfg.model) == per_layer_attention(cfg)


def per_layer_attention(cfg):
    return [dataclasses.replace(spec, layers="all") for spec in cfg.layer_specs]


@pytest.mark.parametrize("variant", VARIANTS)
def test_names_and_shapes_are_the_llama_state_dict(tmp_path, variant):
    cfg = tiny(**VARIANTS[variant])
    _, out = exported(tmp_path, cfg)
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes == llama_layout(cfg)
    sparse_file = out / "sparse_attention.safetensors"
    assert sparse_file.exists() == (variant == "local_layers")   # "local" has no parameters: empty file
    assert not sparse_file.exists() or read_tensors(out, "sparse_attention.safetensors") == {}
    # safetensors writes through a 0600 temporary file; the folder's files all get one mode.
    assert len({path.stat().st_mode for path in out.iterdir() if path.is_file()}) == 1


def test_arange_weights_land_where_torch_expects_them(tmp_path):
    """Element by element against the torch convention (weight[out, in]) for one layer."""
    cfg = tiny()
    flat, out = exported(tmp_path, cfg, arange=True)
    hf = read_tensors(out, "model.safetensors")
    q, o = flat["layers/1/attn/q_proj"], flat["layers/1/attn/o_proj"]          # [D, N, H], [N, H, D]
    hq, ho = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.o_proj.weight"]
    n, h = cfg.num_heads, cfg.head_dim
    for d, head, c in [(0, 0, 0), (5, 1, 3), (63, 3, 15)]:
        assert hq[head * h + c, d] == q[d, head, c]      # row = output channel head*H + c
        assert ho[d, head * h + c] == o[head, c, d]      # column = input channel head*H + c
    assert hf["model.layers.1.mlp.down_proj.weight"][7, 11] == flat["layers/1/mlp/down_proj"][11, 7]
    assert hf["lm_head.weight"][9, 2] == flat["lm_head"][2, 9]
    assert n * h == hq.shape[0]


def test_sharded_export_writes_an_index_and_imports(tmp_path):
    cfg = tiny(num_layers=2)
    flat, out = exported(tmp_path, cfg, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(llama_layout(cfg))
    _, imported = read_hf(out)
    assert all(np.array_equal(imported[k], v) for k, v in flat.items())


def test_bfloat16_export_rounds_to_nearest_even(tmp_path):
    cfg = tiny(num_layers=1)
    run_cfg, flat, _ = load_checkpoint(save_run(tmp_path, cfg, random_params(cfg)))
    out = export_params(run_cfg, flat, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "np") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    hf = read_tensors(out, "model.safetensors")
    expected = to_hf(flat, layout(cfg).entries)
    for name, x in hf.items():
        assert x.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(x, expected[name].astype(ml_dtypes.bfloat16), err_msg=name)


def test_every_parameter_is_used_exactly_once():
    cfg = tiny(num_layers=2)
    flat = flatten(random_params(cfg))
    entries = layout(cfg).entries
    with pytest.raises(ValueError, match=r"not consumed by any mapping entry \['layers/0/attn/extra'\]"):
        to_hf({**flat, "layers/0/attn/extra": np.zeros(3)}, entries)
    partial = {k: v for k, v in flat.items() if k != "final_norm/scale"}
    with pytest.raises(ValueError, match=r"missing \['final_norm/scale'\]"):
        to_hf(partial, entries)
    with pytest.raises(ValueError, match="more than once"):
        to_hf(flat, entries + entries[:1])
    hf = to_hf(flat, entries)
    shapes = {k: v.shape for k, v in flat.items()}
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        from_hf({k: v for k, v in hf.items() if k != "model.norm.weight"}, entries, shapes)
    bad = dict(hf, **{"model.layers.0.mlp.up_proj.weight": np.zeros((cfg.mlp_dim, cfg.d_model + 1))})
    with pytest.raises(ValueError, match="up_proj.weight: shape"):
        from_hf(bad, entries, shapes)


def test_table_covers_the_model_and_scan_stacking_inverts():
    cfg = tiny(num_layers=2)
    flat = flatten(random_params(cfg))
    assert {e.ours for e in expand(LLAMA, range(2))} == set(flat)
    stacked = stack_layers(flat, 2)
    assert stacked["layers/attn/q_proj"].shape == (2, cfg.d_model, cfg.num_heads, cfg.head_dim)
    restored = unstack_layers(stacked, 2)
    assert restored.keys() == flat.keys() and all(np.array_equal(restored[k], flat[k]) for k in flat)
    with pytest.raises(ValueError, match="leading axis 2, expected num_layers=3"):
        unstack_layers(stacked, 3)
