"""DeepSeek Sparse Attention's lightning indexer, as plain functions: its projections, its scores,
the top-k keys per query token (optionally HISA's block candidates first) and its KL losses.

Axis legend: B batch, T queries, S keys, D model width, J indexer heads, E indexer head dim,
C a chunk of query rows, m keys kept per row.

The indexer of a layer (method notes §6.1; DeepSeek-V3.2-Exp `inference/model.py: Indexer`):
  q[t, j] = x_t W_q[:, j]                    [B, T, J, E]
  k[s]    = LayerNorm(x_s W_k)               [B, S, E]   one key per token, shared by the heads
  w[t, j] = x_t W_w[:, j] / sqrt(J) / sqrt(E)
with RoPE (the model's, at width `rope_dim`) on the first `rope_dim` channels of q and k, and
  I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])       for keys s <= t of t's document.

Memory: scores are never held for the whole sequence. Every pass runs over chunks of `query_chunk`
query rows (`ops.map_query_chunks`, rematerialised in the backward pass), holding [C, S] indexer
scores (x J heads before their sum) and, for the KL target, [N, C, S] attention probabilities per
chunk: chunk x T per head, never [T, T].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsetrain import ops
from sparsetrain.ops.selected_keys import gather_rows, map_query_chunks

LAYER_NORM_EPS = 1e-6   # DeepSeek-V3.2's LayerNorm


class Indexer(NamedTuple):
    """A layer's indexer outputs, float32: q [B, T, J, E], k [B, S, E], w [B, T, J]."""

    q: jax.Array
    k: jax.Array
    w: jax.Array


def layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * scale + bias


def partial_rope(x, positions, rope, rope_dim: int):
    """RoPE on the first `rope_dim` channels of x [B, T, M, E], the rest unchanged."""
    if rope_dim == 0:
        return x
    return jnp.concatenate([rope(x[..., :rope_dim], positions), x[..., rope_dim:]], axis=-1)


def project(x, positions, rope, w_q, w_k, k_scale, k_bias, w_w, rope_dim: int) -> Indexer:
    """The indexer of x [B, T, D]: w_q [D, J, E], w_k [D, E], k_scale/k_bias [E], w_w [D, J]."""
    x = x.astype(jnp.float32)
    heads, dim = w_q.shape[1:]
    q = partial_rope(jnp.einsum("BTD,DJE->BTJE", x, w_q), positions, rope, rope_dim)
    k = layer_norm(jnp.einsum("BTD,DE->BTE", x, w_k), k_scale, k_bias)
    k = partial_rope(k[:, :, None], positions, rope, rope_dim)[:, :, 0]
    w = jnp.einsum("BTD,DJ->BTJ", x, w_w) / math.sqrt(heads * dim)
    return Indexer(q, k, w)


def scores(q, w, k):
    """I [B, C, m] of queries q [B, C, J, E], weights w [B, C, J] against keys k [B, m, E] (shared by
    the rows) or [B, C, m, E] (a row's own)."""
    spec = "BCJE,BSE->BCJS" if k.ndim == 3 else "BCJE,BCSE->BCJS"
    return jnp.einsum("BCJ,BCJS->BCS", w, jax.nn.relu(jnp.einsum(spec, q, k)))


def visible(rows, doc_start, keys):
    """bool [B, C, m]: key positions `keys` ([m] or [B, C, m]) visible to the query rows `rows`
    [B, C]: at or before the row, inside its document (starting at row index doc_start [B, C])."""
    return (keys <= rows[..., None]) & (keys >= doc_start[..., None]) & (keys >= 0)


def top_keys(values, positions, valid, m: int):
    """The `m` best positions of each row, ascending, -1 padded: values/positions/valid [B, C, M]."""
    best, order = jax.lax.top_k(jnp.where(valid, values, -jnp.inf), m)   # ties to the lower column
    chosen = jnp.take_along_axis(positions, order, axis=-1)
    big = jnp.iinfo(jnp.int32).max
    chosen = jnp.sort(jnp.where(best > -jnp.inf, chosen, big), axis=-1)
    return jnp.where(chosen == big, -1, chosen).astype(jnp.int32)


def block_means(k, block_size: int):
    """[B, S, E] -> [B, nK, E]: each block's mean key over its real tokens (HISA's representatives)."""
    b, s, e = k.shape
    n = -(-s // block_size)
    padded = jnp.pad(k, ((0, 0), (0, n * block_size - s), (0, 0))).reshape(b, n, block_size, e)
    counts = jnp.minimum(s - jnp.arange(n) * block_size, block_size)
    return padded.sum(2) / counts[None, :, None]


def select(index: Indexer, doc_start, *, topk: int, query_chunk: int, candidates: str = "tokens",
           block_size: int = 64, candidate_blocks: int = 0, initial_blocks: int = 0, local_blocks: int = 1):
    """Each query token's top-`topk` keys by indexer score: int32 [B, T, m] ascending, -1 padded.

    candidates="tokens": DSA, every visible key scored (chunk x S per step). "blocks": HISA, each
    earlier key block scored by its mean key, the best `candidate_blocks` kept (the first
    `initial_blocks` and the `local_blocks` ending at the token's own block forced, so a block is
    never scored by keys after the token), and only their keys scored (chunk x candidate_blocks x
    block_size per step). doc_start [B, T]: row index of each token's document's first token.
    """
    seq = index.k.shape[1]
    rows = jnp.broadcast_to(jnp.arange(index.q.shape[1], dtype=jnp.int32), doc_start.shape)
    if candidates == "tokens":
        m = min(topk, seq)
        everything = jnp.arange(seq, dtype=jnp.int32)

        def chunk(q, w, rows, doc_start):
            return top_keys(scores(q, w, index.k), jnp.broadcast_to(everything, (*rows.shape, seq)),
                            visible(rows, doc_start, everything), m)
    else:
        n_blocks = -(-seq // block_size)
        n_cand = min(candidate_blocks, n_blocks)
        m = min(topk, n_cand * block_size)
        representatives = block_means(index.k, block_size)

        def chunk(q, w, rows, doc_start):
            j = jnp.arange(n_blocks)
            valid = (j <= rows[..., None] // block_size) & (j >= doc_start[..., None] // block_size)
            blocks, _ = ops.topk_block_lists(scores(q, w, representatives), n_cand, force_first=initial_blocks,
                                             force_local=local_blocks, valid=valid)
            keys = (blocks[..., None] * block_size + jnp.arange(block_size)).reshape(*rows.shape, -1)
            keys = jnp.where(jnp.repeat(blocks, block_size, axis=-1) >= 0, keys, -1)
            return top_keys(scores(q, w, gather_rows(index.k, keys)), keys, visible(rows, doc_start, keys), m)

    return map_query_chunks(chunk, (index.q, index.w, rows, doc_start), (0, 0, -1, 0), query_chunk)


def head_mean_probs(q, k, rows, doc_start, keys):
    """Main attention probabilities of query rows q [B, C, N, H] over keys k [B, m, K, H] (or a
    row's own [B, C, m, K, H]) at positions `keys`, softmax per head over the visible ones, then
    summed over heads and L1-normalised: f32 [B, C, m]."""
    n, kh, h = q.shape[2], k.shape[-2], q.shape[-1]
    qg = q.reshape(*q.shape[:2], kh, n // kh, h)
    spec = "BCKGH,BSKH->BCKGS" if k.ndim == 4 else "BCKGH,BCSKH->BCKGS"
    logits = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    ok = visible(rows, doc_start, keys)
    # -1e30, not -inf: padded rows see no key, and a row of -inf would give NaN.
    probs = jax.nn.softmax(jnp.where(ok[:, :, None, None], logits, -1e30), axis=-1)
    return jnp.where(ok, probs.mean((2, 3)), 0.0)


def row_kl(target, index_logits, valid):
    """KL(target || softmax(index_logits)) over the valid entries of each row [B, C, m], in nats."""
    log_p = jax.nn.log_softmax(jnp.where(valid, index_logits, -1e30), axis=-1)   # finite on empty rows
    terms = jax.scipy.special.xlogy(target, target) - jnp.where(valid, target * log_p, 0.0)
    return jnp.where(valid, terms, 0.0).sum(-1)


def kl_rows(index: Indexer, q, k, doc_start, *, query_chunk: int, selected=None):
    """Per query row, KL(p || softmax(I)) in nats: f32 [B, T].

    p is the main attention's probabilities summed over its heads and L1-normalised (the paper's
    target), q [B, T, N, H] and k [B, S, K, H] after RoPE, without gradient: the indexer learns to
    predict the layer, the layer never learns from the indexer. selected=None: over every visible
    key (the dense warm-up); else int [B, T, m] key lists: over the selected keys only,
    with p and softmax(I) both renormalised on them (sparse training).
    """
    q, k = jax.lax.stop_gradient((q, k))
    rows = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), doc_start.shape)
    if selected is None:
        everything = jnp.arange(k.shape[1], dtype=jnp.int32)

        def chunk(iq, iw, qc, rows, doc_start):
            target = head_mean_probs(qc, k, rows, doc_start, everything)
            return row_kl(target, scores(iq, iw, index.k), visible(rows, doc_start, everything))

        args, pads = (index.q, index.w, q, rows, doc_start), (0, 0, 0, -1, 0)
    else:
        def chunk(iq, iw, qc, rows, doc_start, keys):
            target = head_mean_probs(qc, gather_rows(k, keys), rows, doc_start, keys)
            return row_kl(target, scores(iq, iw, gather_rows(index.k, keys)), visible(rows, doc_start, keys))

        args, pads = (index.q, index.w, q, rows, doc_start, selected), (0, 0, 0, -1, 0, -1)
    return map_query_chunks(chunk, args, pads, query_chunk)


def recall_rows(q, k, doc_start, selected, *, query_chunk: int):
    """f32 [B, T]: the share of each row's dense head-mean attention probability (the KL target)
    that its selected keys int [B, T, m] hold. No gradient."""
    q, k = jax.lax.stop_gradient((q, k))
    rows = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), doc_start.shape)
    everything = jnp.arange(k.shape[1], dtype=jnp.int32)

    def chunk(qc, rows, doc_start, keys):
        target = head_mean_probs(qc, k, rows, doc_start, everything)
        return jnp.take_along_axis(target, jnp.maximum(keys, 0), axis=-1).sum(-1, where=keys >= 0)

    return map_query_chunks(chunk, (q, rows, doc_start, selected), (0, -1, 0, -1), query_chunk)
