"""Cross-entropy of the output head, fused with its gradient, whole or a chunk of tokens at a time.

The [B, T, V] float32 logits are among the largest arrays of a long-context step (the 125M config,
T=16384, V=32768: 2 GiB per sequence, and as much again for their gradient). `head_loss` computes
the loss's gradient with respect to the hidden states and the head in the same pass as the loss
(as Liger's fused linear cross-entropy does), so no logits are kept for the backward pass. With
`chunk` > 0 it projects `chunk` tokens at a time inside a scan, so no step holds more than
[chunk, V] logits, at no extra matmul; with `chunk` = 0 the whole batch is one chunk.

The price of computing gradients early: what is differentiated is the weighted loss sum itself,
not per-token losses a caller could weigh afterwards; the weights (the loss mask) go in.

Axis legend: B batch, T sequence, D model width, V vocabulary, C chunks, S tokens per chunk.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# logits_fn(h [..., D], head [D, V]) -> float32 logits [..., V]; differentiable in both.
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _lse_and_losses(logits: jax.Array, targets: jax.Array, z_loss: float) -> tuple[jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse, (lse - target_logit) + z_loss * jnp.square(lse)


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float) -> jax.Array:
    """Per-token cross-entropy [...] in float32 of logits [..., V], plus z_loss * logsumexp^2 (keeps
    logits from drifting)."""
    return _lse_and_losses(logits, targets, z_loss)[1]


def _losses_and_grads(logits_fn: LogitsFn, z_loss: float, h, head, targets, weights):
    """Per-token losses [...] of one chunk and the gradients of sum(weights * losses) with respect
    to h [..., D] and head [D, V]."""
    logits, pullback = jax.vjp(logits_fn, h, head)
    lse, losses = _lse_and_losses(logits, targets, z_loss)
    # d loss / d logits = softmax * (1 + 2 z lse) - onehot(target): one elementwise pass over the
    # logits, which the head's pullback reads once.
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    probs = jnp.exp(logits - lse[..., None]) * (1 + 2 * z_loss * lse)[..., None]
    dlogits = (probs - (vocab == targets[..., None])) * weights[..., None]
    dh, dhead = pullback(dlogits)
    return losses, dh, dhead


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [C, S, ...]. Chunk c holds the tokens whose flat index is c mod C: every chunk
    takes an equal slice of every batch row (and sequence shard), so a chunk stays spread over the
    devices that hold x."""
    b, t = x.shape[:2]
    return x.reshape(chunk, b * t // chunk, *x.shape[2:]).swapaxes(0, 1)


def _from_chunks(x: jax.Array, b: int, t: int) -> jax.Array:
    return x.swapaxes(0, 1).reshape(b, t, *x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_loss(logits_fn: LogitsFn, z_loss: float, chunk: int, h, head, targets, weights):
    # Undifferentiated (evaluation): losses only, nothing kept.
    if chunk == 0:
        losses = token_losses(logits_fn(h, head), targets, z_loss)
    else:
        def chunk_losses(_, xs):
            h_chunk, target_chunk = xs
            return None, token_losses(logits_fn(h_chunk, head), target_chunk, z_loss)

        _, losses = jax.lax.scan(chunk_losses, None, (_to_chunks(h, chunk), _to_chunks(targets, chunk)))
        losses = _from_chunks(losses, *h.shape[:2])
    return jnp.sum(losses * weights)


def _fused_loss_fwd(logits_fn, z_loss, chunk, h, head, targets, weights):
    if chunk == 0:
        losses, dh, dhead = _losses_and_grads(logits_fn, z_loss, h, head, targets, weights)
    else:
        def add_chunk(dhead_sum, xs):
            h_chunk, target_chunk, weight_chunk = xs
            losses, dh, dhead = _losses_and_grads(logits_fn, z_loss, h_chunk, head, target_chunk, weight_chunk)
            return dhead_sum + dhead, (losses, dh)

        xs = tuple(_to_chunks(x, chunk) for x in (h, targets, weights))
        dhead, (losses, dh) = jax.lax.scan(add_chunk, jnp.zeros_like(head), xs)
        losses, dh = _from_chunks(losses, *h.shape[:2]), _from_chunks(dh, *h.shape[:2])
    return jnp.sum(losses * weights), (dh, dhead, losses, targets)


def _fused_loss_bwd(logits_fn, z_loss, chunk, residuals, g):
    dh, dhead, losses, targets = residuals
    return ((g * dh).astype(dh.dtype), (g * dhead).astype(dhead.dtype),
            np.zeros(targets.shape, jax.dtypes.float0), g * losses)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def head_loss(logits_fn: LogitsFn, h: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
              z_loss: float, chunk: int) -> jax.Array:
    """Sum over tokens of weights * cross-entropy (+ z-loss) of the output head, float32.

    logits_fn: (hidden states [..., D], head [D, V]) -> float32 logits [..., V]; it should cast the
    float32 master weight itself, so the head's gradient accumulates over chunks in float32.
    h: [B, T, D]; head: [D, V]; targets: int [B, T]; weights: [B, T] (the loss mask); chunk: tokens
    per chunk (0: all at once, the full logits), must divide B * T.
    Differentiable in h, head and weights.
    """
    b, t, _ = h.shape
    if chunk < 0 or (chunk and (b * t) % chunk):
        raise ValueError(f"trainer.loss_chunk={chunk} must be 0 or divide the {b * t} tokens of a batch "
                         f"({b} x {t})")
    return _fused_loss(logits_fn, z_loss, chunk, h, head, targets, weights.astype(jnp.float32))
