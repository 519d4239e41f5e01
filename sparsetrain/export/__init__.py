"""Export to PyTorch / Hugging Face: `python -m sparsetrain.export CHECKPOINT_DIR OUT_DIR`.

mapping.py: our parameter paths <-> Llama tensor names and layouts; hf_config.py: ModelConfig <->
config.json; sparse_layers.py: the per-layer `sparse_attention` block (from each method's
`export`); layout.py: which tensors go to which file; safetensors_io.py: numpy safetensors folders;
export.py: the folder writer; torch/: the PyTorch model for sparse layers (modeling_sparse_llama.py,
attention_common.py) and one file per method, copied into exports as needed. import_hf.py reads
Hugging Face folders back; pretrained.py loads any checkpoint as a live model.
"""


def __getattr__(name: str):
    # Lazy: the importer (sparsetrain.export.import_hf) uses the submodules, and export.py imports it back.
    if name in ("export_checkpoint", "export_params"):
        from sparsetrain.export import export
        return getattr(export, name)
    raise AttributeError(f"module 'sparsetrain.export' has no attribute {name!r}")


__all__ = ["export_checkpoint", "export_params"]
