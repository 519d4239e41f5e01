"""Export a checkpoint as a Hugging Face Llama folder.

OUT_DIR gets config.json, model.safetensors (sharded with an index above 5 GiB), generation_config.json,
the tokenizer files, and a README.md model card. Models with sparse attention layers also get
sparse_attention.safetensors (the methods' extra parameters), a `sparse_attention` block and
`auto_map` in config.json, and modeling_sparse_llama.py, which transformers runs with
`trust_remote_code=True`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from sparsetrain.config import RunConfig
from sparsetrain.data.tokenizers import load_tokenizer
from sparsetrain.export import hf_config
from sparsetrain.export.layout import MODEL_FILE, SPARSE_FILE, layout
from sparsetrain.export.mapping import to_hf, unstack_layers
from sparsetrain.export.safetensors_io import DEFAULT_MAX_SHARD_BYTES, DTYPES, write_tensors
from sparsetrain.export.pretrained import load_checkpoint
from sparsetrain.export.sparse_layers import is_sparse, sparse_config, torch_impls

TORCH_DIR = Path(__file__).parent / "torch"
# Always shipped with sparse layers: the model, and the helpers every method file imports.
REMOTE_CODE = (f"{hf_config.REMOTE_CODE_MODULE}.py", "attention_common.py")
# Generated per export: imports exactly the method files the model uses (transformers copies only
# the files a remote-code module imports, so the list must be static text).
METHODS_MODULE = "sparse_methods.py"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16",
                      tokenizer: str | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Export the latest (or the given) checkpoint of a run. `tokenizer`: "byte", a tokenizer file,
    "none" to write none, or None for the run's `data.tokenizer`."""
    cfg, flat, meta = load_checkpoint(checkpoint)
    source = f"{Path(checkpoint)} (step {meta.get('step', '?')})"
    return export_params(cfg, flat, out_dir, dtype=dtype, tokenizer=tokenizer, source=source,
                         max_shard_bytes=max_shard_bytes)


def export_params(cfg: RunConfig, flat: dict[str, np.ndarray], out_dir: str | Path, *,
                  dtype: str = "bfloat16", tokenizer: str | None = None, source: str = "",
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the folder for flat float32 params ({"layers/0/attn/q_proj": array, ...}, or stacked
    "layers/attn/q_proj" under scan_layers) of `cfg.model`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} is not empty; export into a new directory")
    model = cfg.model
    specs = model.layer_specs
    sparse = sparse_config(specs) if is_sparse(specs) else None
    tok = _load_tokenizer(cfg, tokenizer)
    eos_id, pad_id = (tok.eos_id, tok.pad_id) if tok is not None else (None, None)
    config = hf_config.to_hf_config(model, dtype=dtype, eos_token_id=eos_id, pad_token_id=pad_id,
                                    sparse_attention=sparse)
    if model.scan_layers:
        flat = unstack_layers(flat, model.num_layers)
    tensors_layout = layout(model)
    tensors = to_hf(flat, tensors_layout.entries)
    # Cast after the layout change: transposes and reshapes commute with rounding.
    tensors = {name: x.astype(DTYPES[dtype]) for name, x in tensors.items()}

    out.mkdir(parents=True, exist_ok=True)
    write_tensors({e.hf: tensors[e.hf] for e in tensors_layout.model}, out, MODEL_FILE, max_shard_bytes)
    if sparse is not None:
        # One file, written even when empty: the torch loader reads it whole and checks its exact
        # tensor set.
        write_tensors({e.hf: tensors[e.hf] for e in tensors_layout.sparse}, out, SPARSE_FILE,
                      max_shard_bytes=1 << 62)
        _write_remote_code(out, torch_impls(specs))
    if tok is not None:
        tok.save(out)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id})
    (out / "README.md").write_text(model_card(cfg, config, dtype=dtype, source=source))
    return out


def _write_remote_code(out: Path, impls: list[str]) -> None:
    """The torch model files: the base, the shared helpers, each used method's file, and the
    generated module that imports those methods (and nothing else)."""
    for name in (*REMOTE_CODE, *(f"{impl}.py" for impl in impls)):
        shutil.copy(TORCH_DIR / name, out / name)
    lines = ['"""The attention methods this model uses (written by sparsetrain\'s export)."""', ""]
    lines += [f"from .{impl} import ATTENTION as {impl}" for impl in impls]
    lines += ["", f"ATTENTION_METHODS = {{{', '.join(f'{i!r}: {i}' for i in impls)}}}", ""]
    (out / METHODS_MODULE).write_text("\n".join(lines))


def _load_tokenizer(cfg: RunConfig, tokenizer: str | None):
    """The tokenizer to ship (None for "none"); its ids must fit the model's vocabulary."""
    spec = cfg.data.tokenizer if tokenizer is None else tokenizer
    if spec == "none":
        return None
    try:
        tok = load_tokenizer(spec)
    except ValueError as e:
        raise ValueError(f"tokenizer {spec!r} (the run's data.tokenizer unless --tokenizer is given): {e}; "
                         f"pass --tokenizer PATH, or --tokenizer none to export without one") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}")
    return tok


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def model_card(cfg: RunConfig, config: dict, *, dtype: str, source: str) -> str:
    """A short README.md: what the model is and the two ways to load it."""
    m = cfg.model
    sparse = "sparse_attention" in config
    load = ('AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)' if sparse
            else 'AutoModelForCausalLM.from_pretrained(path)')
    lines = [
        "---", "library_name: transformers",
        "tags: [sparsetrain, llama" + (", sparse-attention, custom_code]" if sparse else "]"), "---", "",
        f"# {cfg.name}", "",
        f"A Llama-architecture causal language model trained with sparsetrain and exported from {source or 'a checkpoint'}.",
        "",
        "| layers | width | heads (kv) | head dim | MLP | vocabulary | context | RoPE theta | weights |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {m.num_layers} | {m.d_model} | {m.num_heads} ({m.num_kv_heads}) | {m.head_dim} | {m.mlp_dim} "
        f"| {m.vocab_size} | {m.max_seq_len} | {m.rope.theta:g} | {dtype} |", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'path = "path/to/this/folder"', f"model = {load}", "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```", "",
    ]
    if sparse:
        layers = config["sparse_attention"]["layers"]
        lines += [
            "Some layers use sparse attention, implemented in `modeling_sparse_llama.py` (pure PyTorch), "
            "hence `trust_remote_code=True`; their extra parameters, if any, are in "
            "`sparse_attention.safetensors`. `model.safetensors` holds exactly the Llama tensors.", "",
            "| layer | attention |", "| --- | --- |",
            *[f"| {i} | {json.dumps(entry)} |" for i, entry in enumerate(layers)], "",
        ]
    return "\n".join(lines)
