"""The export checked at real size on a GPU machine (one python with JAX, torch and transformers).

    python3 tests/export/gpu_check.py jax RUN_DIR REF.npz        # JAX float32 logits on a long prompt
    python3 tests/export/gpu_check.py torch HF_DIR REF.npz       # transformers (on CUDA if any) vs REF.npz

The prompt is the first 1024 bytes (byte tokenizer) of the running interpreter's `json/encoder.py`.
The torch side prints one JSON line: max |difference| over the logit scale, per-token
KL(JAX || torch) (mean and max) and greedy next-token agreement. Results are in docs/export.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PROMPT_BYTES = 1024


def prompt_tokens() -> np.ndarray:
    source = (Path(json.__file__).parent / "encoder.py").read_bytes()[:PROMPT_BYTES]
    return np.frombuffer(source, np.uint8).astype(np.int32)[None]   # [1, T]


def jax_reference(run_dir: str, out: str) -> None:
    import jax
    from sparsetrain import load_pretrained
    model, _ = load_pretrained(run_dir, dtype="float32")
    tokens = prompt_tokens()
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(tokens))
    np.savez(out, tokens=tokens, logits=logits)


def torch_compare(hf_dir: str, ref_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    torch.backends.cuda.matmul.allow_tf32 = False   # TF32 would blur a float32 comparison
    torch.backends.cudnn.allow_tf32 = False
    ref = np.load(ref_path)
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True,
                                                       attn_implementation="eager")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["tokens"]).long().to(device)).logits.float().cpu().numpy()
    theirs, ours = logits.astype(np.float64), ref["logits"].astype(np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_log, q_log = log_softmax(ours), log_softmax(theirs)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    print(json.dumps({
        "dir": hf_dir, "dtype": str(model.dtype), "tokens": int(ref["tokens"].shape[1]),
        "missing_or_unexpected": sorted(map(str, info["missing_keys"] | info["unexpected_keys"])),
        "max_abs_diff_over_scale": float(np.abs(theirs - ours).max() / np.abs(ours).max()),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "greedy_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
    }))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"jax": jax_reference, "torch": torch_compare}[command](*args)
