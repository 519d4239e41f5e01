"""Checks that run in the PyTorch-only environment (.venv-torch: torch + transformers, no JAX).

    python torch_checks.py parity DIR            # DIR: an export plus jax_outputs.npz beside it
    python torch_checks.py packed DIR            # DIR: an export plus jax_packed.npz beside it
    python torch_checks.py sparse_refusals DIR   # DIR: an export with sparse layers
    python torch_checks.py tokenizer DIR TEXT_FILE
    python torch_checks.py bf16 DIR REFERENCE_NPZ
    python torch_checks.py make_llama OUT_DIR [ROPE_JSON]  # a random transformers Llama for the import test
    python torch_checks.py rope_frequencies JSON # {name: config.json dict} -> transformers' RoPE per name
    python torch_checks.py serve                 # the checks above, one request per stdin line (see serve)

Each prints one line "torch_checks result: {JSON of measurements}"; the pytest side (tests/export/test_torch_*.py) asserts on
them, so thresholds live with the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

torch.set_grad_enabled(False)
SPARSE_FILE = "sparse_attention.safetensors"


def is_sparse(directory: Path) -> bool:
    return "sparse_attention" in json.loads((directory / "config.json").read_text())


def load(directory: Path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, output_loading_info=True,
        trust_remote_code=is_sparse(directory), **kwargs)


def loading_info(info: dict) -> dict:
    return {key: sorted(map(str, value)) for key, value in info.items()}


def config_diff(directory: Path) -> dict:
    """Keys where our config.json differs from what transformers writes for the same config."""
    config = AutoConfig.from_pretrained(directory, trust_remote_code=is_sparse(directory))
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        theirs = json.loads((Path(tmp) / "config.json").read_text())
    ours = json.loads((directory / "config.json").read_text())
    # rope_theta, rope_scaling: our top-level copies for transformers 4.x readers, which 5.x folds into
    # rope_parameters.
    ignored = {"transformers_version", "rope_theta", "rope_scaling"}
    return {key: [ours.get(key), theirs.get(key)] for key in sorted(set(ours) | set(theirs))
            if key not in ignored and ours.get(key) != theirs.get(key)}


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def cached_decode_diff(model, tokens, steps: int = 8) -> float:
    """Logits of token-by-token decoding with the KV cache vs the full forward pass."""
    full = model(tokens).logits
    prefix = tokens.shape[1] - steps
    out = model(tokens[:, :prefix], use_cache=True)
    cache, worst = out.past_key_values, 0.0
    for t in range(prefix, tokens.shape[1]):
        out = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        worst = max(worst, max_abs(out.logits[:, 0], full[:, t]))
    return worst


def parity(directory: str) -> dict:
    directory = Path(directory)
    model, info = load(directory)
    ref = np.load(directory / "jax_outputs.npz")
    tokens = torch.from_numpy(ref["tokens"]).long()
    out = model(tokens, output_hidden_states=True)
    # transformers' hidden_states: the embeddings, each layer's output, and for the last layer the
    # output after the final norm; the JAX side saves the same list.
    hidden = [h.numpy() for h in out.hidden_states]
    jax_hidden = [ref[f"hidden_{i}"] for i in range(len(hidden))]
    return {
        "class": type(model).__name__,
        "loading_info": loading_info(info),
        "config_diff": config_diff(directory),
        "eos_token_id": GenerationConfig.from_pretrained(directory).eos_token_id,
        "logits_max_abs_diff": max_abs(out.logits.numpy(), ref["logits"]),
        "logits_scale": float(np.abs(ref["logits"]).max()),
        "hidden_max_abs_diff": [max_abs(a, b) for a, b in zip(hidden, jax_hidden)],
        "hidden_scale": [float(np.abs(b).max()) for b in jax_hidden],
        "cached_decode_max_abs_diff": cached_decode_diff(model, tokens),
    }


def packed(directory: str) -> dict:
    """jax_packed.npz beside the export: tokens and position ids [B, T] of packed rows (restarting per
    document) and the JAX logits with segment ids; the model runs them as transformers packs rows."""
    model, _ = load(Path(directory))
    ref = np.load(Path(directory) / "jax_packed.npz")
    logits = model(torch.from_numpy(ref["tokens"]).long(), position_ids=torch.from_numpy(ref["positions"]).long(),
                   use_cache=False).logits
    return {"logits_max_abs_diff": max_abs(logits.numpy(), ref["logits"]),
            "logits_scale": float(np.abs(ref["logits"]).max())}


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # the message is what the test asserts on
        return f"{type(e).__name__}: {e}"
    return ""


def _copy(directory: Path, tmp: Path, name: str) -> Path:
    target = tmp / name
    shutil.copytree(directory, target)
    return target


def sparse_refusals(directory: str) -> dict:
    """The sparse loader's strictness: extra and missing tensors in sparse_attention.safetensors."""
    directory = Path(directory)
    result = {"without_remote_code": _error(lambda: AutoModelForCausalLM.from_pretrained(directory))}
    model, info = load(directory)
    result["class"], result["loading_info"] = type(model).__name__, loading_info(info)
    remote = sys.modules[type(model).__module__]   # the copy of modeling_sparse_llama.py transformers imported
    tmp = Path(tempfile.mkdtemp())

    extra = _copy(directory, tmp, "extra")
    tensors = load_file(extra / SPARSE_FILE)
    tensors["model.layers.1.self_attn.attend.bogus"] = torch.zeros(3)
    save_file(tensors, extra / SPARSE_FILE, metadata={"format": "pt"})
    result["extra"] = _error(lambda: load(extra))

    # A method with one parameter, registered the way future methods will be.
    @remote.register_attention("test_with_parameter")
    class WithParameter(remote.ATTENTION_METHODS["local"]):
        def __init__(self, config, spec):
            super().__init__(config, spec)
            self.temperature = torch.nn.Parameter(torch.ones(config.num_attention_heads))

    missing = _copy(directory, tmp, "missing")
    config = json.loads((missing / "config.json").read_text())
    config["sparse_attention"]["layers"][1]["torch_impl"] = "test_with_parameter"
    (missing / "config.json").write_text(json.dumps(config))
    result["missing"] = _error(lambda: remote.SparseLlamaForCausalLM.from_pretrained(missing))

    tensors = load_file(missing / SPARSE_FILE)
    heads = config["num_attention_heads"]
    tensors["model.layers.1.self_attn.attend.temperature"] = torch.arange(heads, dtype=torch.float32)
    save_file(tensors, missing / SPARSE_FILE, metadata={"format": "pt"})
    model, info = remote.SparseLlamaForCausalLM.from_pretrained(missing, output_loading_info=True)
    result["with_parameter_loading_info"] = loading_info(info)
    result["with_parameter_value"] = model.model.layers[1].self_attn.attend.temperature.tolist()
    return result


def tokenizer(directory: str, text_file: str) -> dict:
    tok = AutoTokenizer.from_pretrained(directory)
    text = Path(text_file).read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]
    return {"ids": ids, "decoded": tok.decode(ids), "eos": tok.eos_token_id, "pad": tok.pad_token_id,
            "bos": tok.bos_token_id, "size": len(tok)}


def bf16(directory: str, reference: str) -> dict:
    """The bfloat16 export: dtypes, values (== float32 reference rounded by torch), and a forward pass."""
    directory, ref = Path(directory), np.load(reference)
    dtypes, mismatched = set(), []
    with safe_open(directory / "model.safetensors", "pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            x = f.get_tensor(name)
            dtypes.add(str(x.dtype))
            if not torch.equal(x, torch.from_numpy(ref[name]).to(torch.bfloat16)):
                mismatched.append(name)
    model = AutoModelForCausalLM.from_pretrained(directory)
    logits = model(torch.arange(16)[None] % model.config.vocab_size).logits
    return {"metadata": metadata, "dtypes": sorted(dtypes), "mismatched": mismatched,
            "model_dtype": str(model.dtype), "finite": bool(torch.isfinite(logits).all())}


def make_llama(out_dir: str, rope_json: str = "") -> dict:
    """A random tiny GQA Llama (perturbed norms, RoPE theta 500, or the rope_parameters given as JSON),
    saved in float32 and as sharded bfloat16, with its float32 logits on 300 tokens."""
    torch.manual_seed(0)
    rope = json.loads(rope_json) if rope_json else {"rope_type": "default", "rope_theta": 500.0}
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         rms_norm_eps=1e-6, rope_parameters=rope,
                         tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    for name, p in model.named_parameters():
        p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    out = Path(out_dir)
    tokens = torch.randint(0, config.vocab_size, (2, 300))
    np.savez(out / "torch_outputs.npz", tokens=tokens.numpy(), logits=model(tokens).logits.numpy())
    model.save_pretrained(out / "f32")
    model.to(torch.bfloat16).save_pretrained(out / "bf16_sharded", max_shard_size="100KB")  # rounds in place: last
    return {"bf16_files": sorted(p.name for p in (out / "bf16_sharded").iterdir())}


def rope_frequencies(configs_file: str) -> dict:
    """For each named config.json dict: the inverse frequencies and cos/sin factor of the rotary
    embedding transformers' Llama builds from it."""
    out = {}
    for name, hf in json.loads(Path(configs_file).read_text()).items():
        rotary = LlamaRotaryEmbedding(LlamaConfig(**hf))
        out[name] = {"inv_freq": rotary.inv_freq.tolist(), "attention_factor": float(rotary.attention_scaling)}
    return out


RESULT_MARKER = "torch_checks result: "   # on its own line; transformers' prompts also write to stdout
CHECKS = {"parity": parity, "packed": packed, "sparse_refusals": sparse_refusals, "tokenizer": tokenizer, "bf16": bf16,
          "make_llama": make_llama, "rope_frequencies": rope_frequencies}


def serve() -> None:
    """Run checks until stdin closes: each stdin line a JSON list [command, *args], each answered by a result
    line {"result": ...} or {"error": traceback}. Importing torch and transformers costs ~5 CPU-s, more than
    most checks: the test suite pays it once per worker instead of once per check."""
    requests = os.fdopen(os.dup(0), "r")
    # Nothing else reads the requests: a check that prompts (remote code without trust_remote_code) gets
    # end of file and refuses at once, as it does in a one-check run without stdin.
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(os.devnull)
    for line in requests:
        command, *args = json.loads(line)
        try:
            reply = {"result": CHECKS[command](*args)}
        except Exception:  # the test shows it; the next check still runs
            reply = {"error": traceback.format_exc()}
        print(f"\n{RESULT_MARKER}{json.dumps(reply)}", flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "serve":
        serve()
    else:
        print(f"\n{RESULT_MARKER}{json.dumps(CHECKS[command](*args))}")
