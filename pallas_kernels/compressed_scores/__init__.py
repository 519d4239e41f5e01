"""InfLLM-V2's block scores from compressed keys: a fused Pallas Triton kernel and its jnp reference."""
