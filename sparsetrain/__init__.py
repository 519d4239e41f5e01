"""sparsetrain: train transformers with trainable sparse attention in JAX/Pallas."""


def __getattr__(name: str):
    # Lazy, so that `import sparsetrain` (configs, the train.py CLI) does not import JAX.
    if name == "load_pretrained":
        from sparsetrain.export.pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")


__all__ = ["load_pretrained"]
