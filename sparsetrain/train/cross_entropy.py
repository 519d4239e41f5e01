"""Cross-entropy of the output head, whole or a chunk of tokens at a time.

The [B, T, V] float32 logits are among the largest arrays of a long-context step (the 125M config,
T=16384, V=32768: 2 GiB per sequence, and as much again for their gradient). With `chunk` > 0 the
loss projects `chunk` tokens at a time inside a scan whose body is rematerialised, so neither the
forward nor the backward pass holds more than [chunk, V] logits; the price is one extra head matmul
in the backward pass.

Axis legend: B batch, T sequence, D model width, V vocabulary, C chunks, S tokens per chunk.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float) -> jax.Array:
    """Per-token cross-entropy [...] in float32 of logits [..., V], plus z_loss * logsumexp^2 (keeps
    logits from drifting)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (lse - target_logit) + z_loss * jnp.square(lse)


def head_token_losses(logits_fn: Callable[[jax.Array], jax.Array], h: jax.Array, targets: jax.Array,
                      z_loss: float, chunk: int) -> jax.Array:
    """`token_losses(logits_fn(h), targets, z_loss)` [B, T], computed `chunk` tokens at a time.

    logits_fn: the output head, hidden states [..., D] -> float32 logits [..., V]; it should cast
    float32 master weights itself, so the scan accumulates their gradient in float32.
    h: [B, T, D]; targets: int [B, T]; chunk: tokens per chunk (0: all at once, the full logits),
    must divide B * T.
    """
    if chunk == 0:
        return token_losses(logits_fn(h), targets, z_loss)
    b, t, d = h.shape
    if (b * t) % chunk:
        raise ValueError(f"trainer.loss_chunk={chunk} must divide the {b * t} tokens of a batch ({b} x {t})")
    num_chunks = b * t // chunk
    # Chunk c holds the tokens whose flat index is c mod C: every chunk takes an equal slice of every
    # batch row (and sequence shard), so a chunk stays spread over the devices that hold h.
    h_chunks = h.reshape(chunk, num_chunks, d).swapaxes(0, 1)             # [C, S, D]
    target_chunks = targets.reshape(chunk, num_chunks).swapaxes(0, 1)     # [C, S]

    # Rematerialised: the backward pass recomputes a chunk's logits instead of keeping them all.
    @jax.checkpoint
    def chunk_losses(_, xs):
        h_chunk, target_chunk = xs
        return None, token_losses(logits_fn(h_chunk), target_chunk, z_loss)  # [S]

    _, losses = jax.lax.scan(chunk_losses, None, (h_chunks, target_chunks))  # [C, S]
    return losses.swapaxes(0, 1).reshape(b, t)
