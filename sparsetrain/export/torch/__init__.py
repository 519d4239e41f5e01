"""PyTorch-side files copied into exported folders; never imported by the JAX side."""
