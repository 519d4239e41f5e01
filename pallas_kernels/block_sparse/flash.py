"""The online-softmax pieces shared by the Triton forward kernels (tile and token level)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import triton as pltr


def softmax_update(carry, s, v, *, may_be_empty: bool, precision, row_max=None):
    """One key block of the base-2 online softmax: carry (acc, m, l) and logits s [rows, bs].

    may_be_empty: some row of s may be all -inf (a masked tile). Such a row may have seen only
    masked keys so far (m_new = -inf): it subtracts 0 instead, so that exp2 gives 0 rather than
    NaN. Unmasked tiles always hold a finite maximum.
    row_max: s.max(axis=1) when the caller needs it too (it is then reduced once, not twice).
    """
    acc, m, l = carry
    m_new = jnp.maximum(m, s.max(axis=1) if row_max is None else row_max)
    m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if may_be_empty else m_new
    alpha = jnp.exp2(m - m_sub)
    p = jnp.exp2(s - m_sub[:, None])
    l = l * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + pltr.dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_new, l


def softmax_init(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_finish(acc, m, l):
    """(o f32 [rows, D], base-2 LSE [rows]); a row with no visible key gets o = 0 and LSE +inf,
    so that the backward's p = exp2(s - lse) is 0."""
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    return acc / l_safe[:, None], jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))
