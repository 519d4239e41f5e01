"""SSA alignment (arXiv 2511.20102, zhenyi4/ssa; method notes §5): keep a sparse layer's output close
to the full attention output it replaces, while training.

In a training step every sparse layer with `ssa=True` computes both outputs and adds

    ssa_weight * [SmoothL1(full, sg(sparse)) + SmoothL1(sg(full), sparse)]

(SmoothL1 with beta 1, mean over elements): the first term pulls full attention towards what the
sparse selection can express, the second keeps the sparse output near the full one. A coin flip per
step, taken from the step's rng and so the same for every layer and reproducible from the seed,
decides which output feeds the next layer. At evaluation only the sparse output is computed.

Deviation: the reference aligns the outputs after its per-head output gates (NSA's g_slc, applied to
both); methods here have no such gate, so the attention outputs before o_proj are aligned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_COIN_STREAM = 0x55A   # folds the step rng into the stream of SSA's coin


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
    """PyTorch's SmoothL1Loss (beta 1, mean) in float32."""
    d = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def alignment_loss(full: jax.Array, sparse: jax.Array) -> jax.Array:
    """SmoothL1(full, sg(sparse)) + SmoothL1(sg(full), sparse): each term moves one side only."""
    return (smooth_l1(full, jax.lax.stop_gradient(sparse))
            + smooth_l1(jax.lax.stop_gradient(full), sparse))


def use_full_output(rng: jax.Array) -> jax.Array:
    """This step's coin: True = the full output feeds the next layer (probability 1/2)."""
    return jax.random.bernoulli(jax.random.fold_in(rng, _COIN_STREAM))
