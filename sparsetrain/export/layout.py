"""Which tensors an exported model holds, under which names, in which file.

`model.safetensors` holds exactly the Hugging Face Llama tensors (`mapping.LLAMA` over every layer),
so plain transformers loads it; `sparse_attention.safetensors` holds the extra parameters of sparse
attention layers (each rule's `export_params()` table, over the layers using that rule).
"""

from __future__ import annotations

import dataclasses

from sparsetrain.config import ModelConfig
from sparsetrain.export.mapping import LLAMA, TRANSFORMS, Entry, expand

MODEL_FILE = "model.safetensors"
SPARSE_FILE = "sparse_attention.safetensors"   # the name modeling_sparse_llama.py loads


@dataclasses.dataclass(frozen=True)
class Layout:
    model: list[Entry]    # -> model.safetensors
    sparse: list[Entry]   # -> sparse_attention.safetensors (sparse models only)

    @property
    def entries(self) -> list[Entry]:
        return self.model + self.sparse


def method_entries(layer: int, spec) -> list[Entry]:
    """The tensors of one layer's method: ours under layers/<i>/attn/attend/, theirs under
    model.layers.<i>.self_attn.attend."""
    return [Entry(f"layers/{layer}/attn/attend/{ours}", f"model.layers.{layer}.self_attn.attend.{theirs}",
                  TRANSFORMS[transform]) for ours, (theirs, transform) in spec.export_params().items()]


def layout(cfg: ModelConfig) -> Layout:
    model = expand(LLAMA, range(cfg.num_layers), skip=frozenset({"lm_head"} if cfg.tie_embeddings else ()))
    sparse = [e for i, spec in enumerate(cfg.layer_specs) for e in method_entries(i, spec)]
    return Layout(model, sparse)
