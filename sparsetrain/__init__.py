"""sparsetrain: train transformers with trainable sparse attention in JAX/Pallas."""
