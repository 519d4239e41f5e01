"""The `sparse_attention` block of an exported config.json, and the torch files a model needs.

Each method says how it is exported in its options class (`export`, a `MethodExport`): the torch
file `sparsetrain/export/torch/<torch_impl>.py` that implements it, the option fields its per-layer
entry carries, and its parameter table. Dense layers (torch_impl "dense") stay transformers' own
LlamaAttention; a method with no export (None) cannot be exported and says so.
"""

from __future__ import annotations

from sparsetrain.attention.spec import DENSE_TORCH_IMPL, MethodExport, MethodOptions, method_options, options_class
from sparsetrain.configbase import ConfigError, to_dict

# config.json["sparse_attention"]["format"]; bump when the block's meaning changes.
SPARSE_FORMAT = 1


def method_export(spec: MethodOptions) -> MethodExport:
    if spec.export is None:
        raise ValueError(f"attention method {spec.method!r} has no PyTorch export yet (its options "
                         f"class defines no `export`)")
    return spec.export


def is_sparse(specs) -> bool:
    return any(method_export(spec).torch_impl != DENSE_TORCH_IMPL for spec in specs)


def torch_impls(specs) -> list[str]:
    """The torch method files (names without .py) the exported model imports, and those they import."""
    exports = [method_export(s) for s in specs]
    return sorted({name for e in exports for name in (e.torch_impl, *e.torch_requires)} - {DENSE_TORCH_IMPL})


def sparse_config(specs: list[MethodOptions]) -> dict:
    """The `sparse_attention` block of config.json: one entry per layer."""
    layers = []
    for spec in specs:
        export, values = method_export(spec), to_dict(spec)
        entry = {"method": spec.method, "torch_impl": export.torch_impl}
        entry.update({name: values[name] for name in export.fields})
        layers.append(entry)
    return {"format": SPARSE_FORMAT, "layers": layers}


def specs_from_sparse_config(block: dict, num_layers: int) -> tuple[MethodOptions, ...]:
    """Inverse of `sparse_config`: rules dense for all layers, then one rule per non-dense layer."""
    if block.get("format") != SPARSE_FORMAT:
        raise ValueError(f"sparse_attention.format={block.get('format')!r}: this version reads "
                         f"format {SPARSE_FORMAT}")
    layers = block.get("layers", [])
    if len(layers) != num_layers:
        raise ValueError(f"sparse_attention.layers has {len(layers)} entries for {num_layers} layers")
    rules = [method_options("dense")]
    for i, entry in enumerate(layers):
        method = entry.get("method")
        try:
            export = options_class(method).export
        except ConfigError as e:
            raise ValueError(f"sparse_attention.layers.{i}: {e}") from None
        if export is None or export.torch_impl == DENSE_TORCH_IMPL:
            continue
        missing = [name for name in export.fields if name not in entry]
        if missing:
            raise ValueError(f"sparse_attention.layers.{i} ({method}) lacks {missing}")
        rules.append(method_options(method, layers=str(i), **{name: entry[name] for name in export.fields}))
    return tuple(rules)
