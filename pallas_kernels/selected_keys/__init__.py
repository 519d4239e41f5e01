"""Attention over individually selected keys (DSA): the Pallas Triton kernel and its jnp reference."""
