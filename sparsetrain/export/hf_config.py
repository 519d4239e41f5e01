"""Our ModelConfig <-> a Hugging Face Llama `config.json` dict.

Written in the form transformers 5.x writes itself (checked against `LlamaConfig.save_pretrained` in
the torch parity test): RoPE under `rope_parameters` ({"rope_type", "rope_theta", ...}) and the
weight dtype under `dtype`. Reading also accepts the transformers 4.x keys (`rope_theta`,
`rope_scaling`, `torch_dtype`). `rope_to_hf` / `rope_from_hf` are the one place where RoPE scalings
(linear, NTK, YaRN) get their Hugging Face names when `models/rope.py` implements them.
"""

from __future__ import annotations

from sparsetrain.config import ModelConfig, RopeConfig

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
SPARSE_ARCHITECTURE = "SparseLlamaForCausalLM"
SPARSE_MODEL_TYPE = "sparse_llama"
REMOTE_CODE_MODULE = "modeling_sparse_llama"


def rope_to_hf(rope: RopeConfig) -> dict:
    """RopeConfig -> transformers `rope_parameters`."""
    if rope.scaling == "none":
        return {"rope_type": "default", "rope_theta": rope.theta}
    # New scalings map here, e.g. "yarn" -> {"rope_type": "yarn", "factor": rope.factor,
    # "original_max_position_embeddings": rope.original_max_len, ...}.
    raise ValueError(f"rope.scaling={rope.scaling!r} has no Hugging Face mapping yet")


def rope_from_hf(hf: dict) -> RopeConfig:
    """transformers `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x) -> RopeConfig."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling rope_type={rope_type!r} is not supported (only 'default'); "
                         f"rope parameters: {params}")
    return RopeConfig(theta=float(theta))


def to_hf_config(cfg: ModelConfig, *, dtype: str, eos_token_id: int | None, pad_token_id: int | None,
                 sparse_attention: dict | None = None) -> dict:
    """config.json for a dense Llama, or for the remote-code sparse Llama when `sparse_attention` (the
    per-layer block from `sparse_layers.sparse_config`) is given."""
    if cfg.d_model % cfg.num_heads:
        # transformers 5 LlamaConfig.validate_architecture rejects this even with head_dim set.
        raise ValueError(f"model.d_model={cfg.d_model} must be a multiple of model.num_heads="
                         f"{cfg.num_heads} for transformers' LlamaConfig")
    rope = rope_to_hf(cfg.rope)
    hf = {
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps,
        "rope_parameters": rope,
        # 4.x readers ignore rope_parameters; 5.x reads this key into rope_parameters identically.
        "rope_theta": rope["rope_theta"],
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,   # our data pipeline never inserts a beginning-of-sequence token
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
    }
    if sparse_attention is not None:
        hf.update({
            "architectures": [SPARSE_ARCHITECTURE],
            "model_type": SPARSE_MODEL_TYPE,
            "auto_map": {"AutoConfig": f"{REMOTE_CODE_MODULE}.SparseLlamaConfig",
                         "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.{SPARSE_ARCHITECTURE}"},
            "sparse_attention": sparse_attention,
        })
    return hf


def from_hf_config(hf: dict, **overrides) -> ModelConfig:
    """A Hugging Face Llama config.json dict -> ModelConfig (attention all dense; the caller adds
    sparse specs). Raises ValueError naming the key for anything our model cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", SPARSE_MODEL_TYPE):
        raise ValueError(f"config.json model_type={model_type!r}: only Llama-architecture models "
                         f"('llama', {SPARSE_MODEL_TYPE!r}) can be imported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json {key}=true: biases are not supported by our Llama")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], mlp_dim=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        rope=rope_from_hf(hf), **overrides)
