"""Import a Hugging Face Llama folder as a sparsetrain checkpoint.

    python -m sparsetrain.export.import_hf HF_DIR OUT_CHECKPOINT_DIR
    python train.py --init_from OUT_CHECKPOINT_DIR model.d_model=... (the overrides it prints)

HF_DIR holds config.json and model.safetensors (or shards with model.safetensors.index.json) in
bfloat16, float16 or float32; folders exported by sparsetrain with sparse layers also bring their
`sparse_attention` block and sparse_attention.safetensors. Tensors go through the export mapping
table backwards, so export followed by import is bit-exact. Options our Llama cannot represent
(biases, activations other than SiLU, dynamic/longrope RoPE) are rejected with the config key named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from sparsetrain.config import DataConfig, ModelConfig, RunConfig
from sparsetrain.configbase import to_dict
from sparsetrain.export.hf_config import from_hf_config
from sparsetrain.export.layout import MODEL_FILE, SPARSE_FILE, layout
from sparsetrain.export.mapping import from_hf
from sparsetrain.export.safetensors_io import read_tensors
from sparsetrain.export.sparse_layers import specs_from_sparse_config
from sparsetrain.checkpoint import save_params
from sparsetrain.checkpoint.model_def import ModelDef, flatten

# The ModelConfig fields a checkpoint's shapes and numerics depend on: what train.py must be told.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "mlp_dim", "max_seq_len", "rms_eps", "tie_embeddings")


def read_hf(hf_dir: str | Path) -> tuple[RunConfig, dict[str, np.ndarray]]:
    """The derived run config and our flat float32 params ({"layers/0/attn/q_proj": array, ...})."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} has no config.json")
    hf = json.loads((hf_dir / "config.json").read_text())
    model = from_hf_config(hf)
    tensors = read_tensors(hf_dir, MODEL_FILE)
    if hf.get("sparse_attention") is not None:
        model = dataclasses.replace(
            model, attention=specs_from_sparse_config(hf["sparse_attention"], model.num_layers))
        tensors.update(read_tensors(hf_dir, SPARSE_FILE))
    if model.tie_embeddings and "lm_head.weight" in tensors:
        # Some writers store the tied head anyway; transformers ignores it, and so do we if it is the tie.
        if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings=true but lm_head.weight differs from the embedding")
        del tensors["lm_head.weight"]
    shapes = {key: value.shape for key, value in flatten(ModelDef.create(model).abstract_params()).items()}
    # bfloat16 and float16 widen to float32 exactly.
    flat = from_hf({name: x.astype(np.float32) for name, x in tensors.items()}, layout(model).entries, shapes)
    data = DataConfig(seq_len=min(DataConfig.seq_len, model.max_seq_len), tokenizer=_tokenizer_spec(hf_dir))
    return RunConfig(name=hf_dir.resolve().name or "imported", model=model, data=data), flat


def _tokenizer_spec(hf_dir: Path) -> str:
    """The folder's tokenizer for data.tokenizer: ours ("byte"), its tokenizer.json, else "byte"."""
    if (hf_dir / "byte_tokenizer.json").is_file() or not (hf_dir / "tokenizer.json").is_file():
        return "byte"
    return str((hf_dir / "tokenizer.json").resolve())


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> RunConfig:
    """Write a params-only checkpoint (step 0) that `train.py --init_from out_dir` accepts, plus the
    derived run config as out_dir/config.json; returns that config."""
    out = Path(out_dir)
    if (out / "checkpoints").exists():
        raise ValueError(f"{out / 'checkpoints'} already exists; import into a new directory")
    cfg, flat = read_hf(hf_dir)
    cfg = dataclasses.replace(cfg, name=out.resolve().name, run_dir=str(out.resolve().parent))
    params = ModelDef.create(cfg.model).params_from_flat(flat)
    save_params(out, 0, params, {"step": 0, "config": to_dict(cfg), "imported_from": str(Path(hf_dir).resolve())})
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return cfg


def train_overrides(model: ModelConfig) -> list[str]:
    """`key=value` overrides that make train.py build this architecture."""
    overrides = [f"model.{name}={getattr(model, name)}" for name in ARCHITECTURE_FIELDS]
    # theta always (the default rarely fits an imported model), the scaling fields when they differ.
    rope = [f"model.rope.{f.name}={getattr(model.rope, f.name)}" for f in dataclasses.fields(model.rope)
            if f.name == "theta" or getattr(model.rope, f.name) != f.default]
    return overrides + rope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsetrain.export.import_hf",
                                     description="Import a Hugging Face Llama folder as a checkpoint.")
    parser.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    parser.add_argument("out_dir", help="new directory for the checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = import_hf(args.hf_dir, args.out_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {args.hf_dir} into {args.out_dir}; fine-tune with\n"
          f"  python train.py --init_from {args.out_dir} data.tokenizer={cfg.data.tokenizer} "
          + " ".join(train_overrides(cfg.model)))
    if any(spec.method != "dense" for spec in cfg.model.attention):
        print("  and the per-layer attention rules of its config.json (model.attention) in a config file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
