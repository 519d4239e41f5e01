"""Llama with per-layer sparse attention, as exported by sparsetrain. Pure PyTorch (no JAX).

sparsetrain copies this file next to the weights; transformers (5.x) imports it with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

through config.json's `auto_map`. The model is transformers' own `LlamaForCausalLM` (same weights in
`model.safetensors`, same names) except that each layer's attention follows config.json's
`sparse_attention.layers[i]`: "dense" keeps `LlamaAttention`; any other `torch_impl` names a method
file shipped beside this one (`local.py`, `seer.py`, ...; `sparse_methods.py`, written by the
export, imports exactly the ones this model uses) whose `ATTENTION` class is built as
`model.layers.{i}.self_attn.attend`. `register_attention` adds a class by hand. A method's
parameters (none for "local") are loaded from `sparse_attention.safetensors`, strictly: a missing or
an unexpected tensor is an error, never a silently random weight.

A method class is an `nn.Module` built as `cls(config, layer_spec)` and called as

    attend(q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling) -> out [B, T, N, H]

with q [B, N, T, H] and k, v [B, K, S, H] after RoPE (k, v include cached keys), q_raw/k_raw the
same before RoPE (current tokens only), hidden the layer's normalised input [B, T, D] (current
tokens only; NSA projects it), attention_mask transformers' 4-D mask or None, positions
the query positions [B or 1, T]. GQA groups are contiguous (`repeat_kv`). Classes with parameters
must initialise them themselves (transformers' `_init_weights` does not know them).

Packed sequences (several documents in one row, as sparsetrain trains by default) follow
transformers' own convention: position ids that restart at each document, use_cache=False and no
attention_mask. transformers then masks dense layers within documents, and each sparse layer runs
its method on each document alone (`attention_common.attend_per_document`).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb
from transformers.utils import cached_file

from .attention_common import attend_per_document
from .sparse_methods import ATTENTION_METHODS

SPARSE_FILE = "sparse_attention.safetensors"
SPARSE_FORMAT = 1
ATTEND = ".self_attn.attend."   # where method parameters live in the module tree


def register_attention(name: str):
    """Class decorator: make `name` usable as a layer's `torch_impl`."""
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTION_METHODS[name] = cls
        return cls
    return register


class SparseLlamaConfig(LlamaConfig):
    model_type = "sparse_llama"
    sparse_attention: dict | None = None   # {"format": 1, "layers": [{"method", "torch_impl", ...}, ...]}


class SparseLlamaAttention(LlamaAttention):
    """LlamaAttention whose softmax step is a registered method (`self.attend`)."""

    def __init__(self, config, layer_idx: int, attend: nn.Module):
        super().__init__(config, layer_idx)
        self.attend = attend

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        # Mirrors LlamaAttention.forward (transformers 5.x), keeping the pre-RoPE q/k for gates.
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q_raw = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k_raw = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q_raw, k_raw, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
            out = self.attend(q, k, v, q_raw=q_raw, k_raw=k_raw, hidden=hidden_states,
                              attention_mask=attention_mask, positions=kwargs["position_ids"], scaling=self.scaling)
        else:   # no cache: packed rows (position ids restarting per document) attend per document
            out = attend_per_document(self.attend, q, k, v, q_raw=q_raw, k_raw=k_raw, hidden=hidden_states,
                                      attention_mask=attention_mask, positions=kwargs["position_ids"],
                                      scaling=self.scaling)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


class SparseLlamaForCausalLM(LlamaForCausalLM):
    config_class = SparseLlamaConfig
    # Method parameters come from sparse_attention.safetensors and are checked there.
    _keys_to_ignore_on_load_missing = [r"\.self_attn\.attend\."]

    def __init__(self, config: SparseLlamaConfig):
        super().__init__(config)
        block = config.sparse_attention or {}
        if block.get("format") != SPARSE_FORMAT:
            raise ValueError(f"config.sparse_attention.format={block.get('format')!r}; this file reads "
                             f"format {SPARSE_FORMAT}")
        layers = block["layers"]
        if len(layers) != config.num_hidden_layers:
            raise ValueError(f"config.sparse_attention.layers has {len(layers)} entries for "
                             f"{config.num_hidden_layers} layers")
        for i, spec in enumerate(layers):
            impl = spec["torch_impl"]
            if impl == "dense":
                continue
            if impl not in ATTENTION_METHODS:
                raise ValueError(f"layer {i}: torch_impl={impl!r} is not registered; known: "
                                 f"{sorted(ATTENTION_METHODS)} and 'dense'")
            self.model.layers[i].self_attn = SparseLlamaAttention(config, i, ATTENTION_METHODS[impl](config, spec))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args,
                                              output_loading_info=True, **kwargs)
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
               if k in kwargs}
        model.load_sparse_attention(cached_file(pretrained_model_name_or_path, SPARSE_FILE, **hub))
        return (model, info) if want_info else model

    def load_sparse_attention(self, path: str) -> None:
        """Copy every method parameter from `path`; raise on any missing, extra or misshaped tensor."""
        tensors = load_file(path)
        expected = {name: p for name, p in self.named_parameters() if ATTEND in name}
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path} does not match the sparse attention layers: missing {missing}, "
                             f"unexpected {unexpected}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                     f"{tuple(expected[name].shape)}")
                expected[name].copy_(tensor)


__all__ = ["ATTENTION_METHODS", "SparseLlamaConfig", "SparseLlamaForCausalLM", "register_attention"]
