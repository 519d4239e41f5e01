"""How each attention method is exported: its parameter mapping and its PyTorch implementation.

A method's extra parameters live under `layers/{i}/attn/attend/...` in our params (the module the
dispatcher builds) and go to `sparse_attention.safetensors` under
`model.layers.{i}.self_attn.attend....` (the module `modeling_sparse_llama.py` builds), through
`params`, a table in the format of `mapping.LLAMA`. `torch_impl` names the class registered with
`@register_attention(...)` in `sparsetrain/export/torch/modeling_sparse_llama.py`, and `spec_fields`
the AttentionSpec fields that class reads from the per-layer entry of config.json's
`sparse_attention` block.

Adding a method: its JAX module (sparsetrain/attention/), a `register_attention` class in the torch
file, and an entry here; tests/export checks that every method of `spec.METHODS` has one.
"""

from __future__ import annotations

import dataclasses

from sparsetrain.attention.spec import METHODS, AttentionSpec
from sparsetrain.export.mapping import Transform

# config.json["sparse_attention"]["format"]; bump when the block's meaning changes.
SPARSE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ExportedMethod:
    torch_impl: str
    spec_fields: tuple[str, ...] = ()
    params: dict[str, tuple[str, Transform]] = dataclasses.field(default_factory=dict)


# "dense" layers keep transformers' own LlamaAttention.
EXPORTED_METHODS: dict[str, ExportedMethod] = {
    "dense": ExportedMethod(torch_impl="dense"),
    "local": ExportedMethod(torch_impl="local",
                            spec_fields=("block_size", "local_blocks", "initial_blocks")),
}
assert set(EXPORTED_METHODS) <= set(METHODS), "EXPORTED_METHODS names a method spec.METHODS lacks"


def exported_method(spec: AttentionSpec) -> ExportedMethod:
    if spec.method not in EXPORTED_METHODS:
        raise ValueError(f"attention method {spec.method!r} has no PyTorch export yet "
                         f"(exportable: {sorted(EXPORTED_METHODS)}); see sparse_registry.py")
    return EXPORTED_METHODS[spec.method]


def is_sparse(specs: list[AttentionSpec]) -> bool:
    return any(spec.method != "dense" for spec in specs)


def sparse_config(specs: list[AttentionSpec]) -> dict:
    """The `sparse_attention` block of config.json: one entry per layer."""
    layers = []
    for spec in specs:
        method = exported_method(spec)
        entry = {"method": spec.method, "torch_impl": method.torch_impl}
        entry.update({name: getattr(spec, name) for name in method.spec_fields})
        layers.append(entry)
    return {"format": SPARSE_FORMAT, "layers": layers}


def specs_from_sparse_config(block: dict, num_layers: int) -> tuple[AttentionSpec, ...]:
    """Inverse of `sparse_config`: AttentionSpec rules, dense for all layers and then one rule per
    non-dense layer."""
    if block.get("format") != SPARSE_FORMAT:
        raise ValueError(f"sparse_attention.format={block.get('format')!r}: this version reads "
                         f"format {SPARSE_FORMAT}")
    layers = block.get("layers", [])
    if len(layers) != num_layers:
        raise ValueError(f"sparse_attention.layers has {len(layers)} entries for {num_layers} layers")
    rules = [AttentionSpec()]
    for i, entry in enumerate(layers):
        method = entry.get("method")
        if method not in EXPORTED_METHODS:
            raise ValueError(f"sparse_attention.layers.{i}.method={method!r} is not one of "
                             f"{sorted(EXPORTED_METHODS)}")
        if method == "dense":
            continue
        names = EXPORTED_METHODS[method].spec_fields
        missing = [name for name in names if name not in entry]
        if missing:
            raise ValueError(f"sparse_attention.layers.{i} ({method}) lacks {missing}")
        fields = {name: entry[name] for name in names}
        rules.append(AttentionSpec(layers=str(i), method=method, **fields))
    return tuple(rules)
