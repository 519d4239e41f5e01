"""Our ModelConfig <-> a Hugging Face Llama `config.json` dict.

Written in the form transformers 5.x writes itself (checked against `LlamaConfig.save_pretrained` in
the torch parity test): RoPE under `rope_parameters` ({"rope_type", "rope_theta", ...}) and the
weight dtype under `dtype`. Reading also accepts the transformers 4.x keys (`rope_theta`,
`rope_scaling`, `torch_dtype`). `rope_to_hf` / `rope_from_hf` are the one place where RoPE scalings
(linear, NTK, YaRN, llama3; `models/rope.py`) get their Hugging Face names.
"""

from __future__ import annotations

import math

from models.rope import ntk_theta
from sparsetrain.config import ModelConfig, RopeConfig

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
SPARSE_ARCHITECTURE = "SparseLlamaForCausalLM"
SPARSE_MODEL_TYPE = "sparse_llama"
REMOTE_CODE_MODULE = "modeling_sparse_llama"


# Our scaling -> transformers' rope_type ("ntk" has no static rope_type: it exports as a plain base).
HF_ROPE_TYPES = {"none": "default", "linear": "linear", "ntk": "default", "yarn": "yarn", "llama3": "llama3"}
# transformers' "dynamic" NTK changes the base with each sequence's length, which jitted fixed-frequency
# RoPE cannot follow; "longrope" needs per-pair factor lists.
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
# Top-level config.json key recording an "ntk" scaling, so that import restores it (transformers keeps
# unknown top-level keys and writes them back; the key's absence means a plain RoPE base).
NTK_KEY = "sparsetrain_ntk_rope"


def rope_to_hf(rope: RopeConfig, head_dim: int) -> dict:
    """RopeConfig -> the config.json keys it sets: transformers 5 `rope_parameters`, the 4.x
    `rope_theta` (and `rope_scaling` when scaled), and NTK_KEY for "ntk"."""
    params = {"rope_type": HF_ROPE_TYPES[rope.scaling], "rope_theta": rope.theta}
    if rope.scaling in ("linear", "yarn", "llama3"):
        params["factor"] = rope.factor
    if rope.scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = rope.original_max_len
    if rope.scaling == "yarn":
        params.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if rope.attention_factor:
            params["attention_factor"] = rope.attention_factor
    if rope.scaling == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    keys = {"rope_parameters": params}
    if rope.scaling == "ntk":
        params["rope_theta"] = ntk_theta(rope, head_dim)
        keys[NTK_KEY] = {"rope_theta": rope.theta, "factor": rope.factor}
    # 4.x readers ignore rope_parameters; 5.x folds these keys into it (rope_scaling == rope_parameters).
    keys["rope_theta"] = params["rope_theta"]
    if params["rope_type"] != "default":
        keys["rope_scaling"] = params
    return keys


def rope_from_hf(hf: dict) -> RopeConfig:
    """transformers `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x) -> RopeConfig."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json rope_parameters.rope_type={rope_type!r} is not supported; "
                         f"choose one of {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json rope_parameters.partial_rotary_factor="
                         f"{params['partial_rotary_factor']}: only 1.0 (RoPE on every channel) is supported")
    if rope_type == "default":
        if NTK_KEY in hf:
            return _ntk_from_hf(hf, theta)
        return RopeConfig(theta=theta)
    # transformers defaults the pretraining length to max_position_embeddings and, for YaRN without a
    # factor, the factor to their ratio.
    original = int(params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 0))
    factor = params.get("factor")
    if factor is None and rope_type == "yarn" and original:
        factor = hf.get("max_position_embeddings", original) / original
    if factor is None:
        raise ValueError(f"config.json rope_parameters.factor is missing for rope_type={rope_type!r}")
    if rope_type == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=float(factor))
    if rope_type == "llama3":
        return RopeConfig(theta=theta, scaling="llama3", factor=float(factor), original_max_len=original,
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]))
    for key in ("mscale", "mscale_all_dim"):
        if params.get(key):
            raise ValueError(f"config.json rope_parameters.{key}={params[key]}: YaRN's DeepSeek-style mscale is "
                             f"not supported (set attention_factor instead)")
    if params.get("truncate", True) is not True:
        raise ValueError("config.json rope_parameters.truncate=false: only the truncated YaRN ramp is supported")
    return RopeConfig(theta=theta, scaling="yarn", factor=float(factor), original_max_len=original,
                      beta_fast=float(params.get("beta_fast") or 32.0),
                      beta_slow=float(params.get("beta_slow") or 1.0),
                      attention_factor=float(params.get("attention_factor") or 0.0))


def _ntk_from_hf(hf: dict, exported_theta: float) -> RopeConfig:
    ntk = hf[NTK_KEY]
    rope = RopeConfig(theta=float(ntk["rope_theta"]), scaling="ntk", factor=float(ntk["factor"]))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if not math.isclose(ntk_theta(rope, head_dim), exported_theta, rel_tol=1e-9):
        raise ValueError(f"config.json {NTK_KEY} (theta {rope.theta}, factor {rope.factor}) does not give "
                         f"rope_parameters.rope_theta={exported_theta}; one of them was edited")
    return rope


def to_hf_config(cfg: ModelConfig, *, dtype: str, eos_token_id: int | None, pad_token_id: int | None,
                 sparse_attention: dict | None = None) -> dict:
    """config.json for a dense Llama, or for the remote-code sparse Llama when `sparse_attention` (the
    per-layer block from `sparse_layers.sparse_config`) is given."""
    if cfg.d_model % cfg.num_heads:
        # transformers 5 LlamaConfig.validate_architecture rejects this even with head_dim set.
        raise ValueError(f"model.d_model={cfg.d_model} must be a multiple of model.num_heads="
                         f"{cfg.num_heads} for transformers' LlamaConfig")
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
        **rope_to_hf(cfg.rope, cfg.head_dim),
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
