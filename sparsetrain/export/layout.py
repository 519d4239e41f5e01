"""Which tensors an exported model holds, under which names, in which file.

`model.safetensors` holds exactly the Hugging Face Llama tensors (`mapping.LLAMA` over every layer),
so plain transformers loads it; `sparse_attention.safetensors` holds the extra parameters of sparse
attention layers (each method's table from `sparse_registry`, over the layers using that method).
"""

from __future__ import annotations

import dataclasses

from sparsetrain.attention.spec import AttentionSpec
from sparsetrain.config import ModelConfig
from sparsetrain.export.mapping import LLAMA, Entry, expand
from sparsetrain.export.sparse_registry import EXPORTED_METHODS, exported_method

MODEL_FILE = "model.safetensors"
SPARSE_FILE = "sparse_attention.safetensors"   # the name modeling_sparse_llama.py loads


@dataclasses.dataclass(frozen=True)
class Layout:
    model: list[Entry]    # -> model.safetensors
    sparse: list[Entry]   # -> sparse_attention.safetensors (sparse models only)

    @property
    def entries(self) -> list[Entry]:
        return self.model + self.sparse


def layer_specs(cfg: ModelConfig) -> list[AttentionSpec]:
    """The attention spec of each layer; raises ValueError for a method with no export."""
    specs = list(cfg.layer_specs)
    for spec in specs:
        exported_method(spec)
    return specs


def layout(cfg: ModelConfig) -> Layout:
    specs = layer_specs(cfg)
    model = expand(LLAMA, range(cfg.num_layers), skip=frozenset({"lm_head"} if cfg.tie_embeddings else ()))
    sparse = []
    for name, method in EXPORTED_METHODS.items():
        sparse += expand(method.params, [i for i, spec in enumerate(specs) if spec.method == name])
    return Layout(model, sparse)
