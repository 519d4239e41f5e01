"""Attention inputs with planted structure, for measuring how a block selection finds relevant keys."""

from __future__ import annotations

import numpy as np


def planted(seq, key_block, heads=4, kv_heads=2, head_dim=32, topics=8, segment=24, seed=0, batch=2):
    """q/k with structure: each block of `key_block` keys carries one of a few topic directions (norm 4),
    and the queries follow topics in runs of about `segment` tokens, both plus N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(batch, kv_heads, topics, head_dim))
    u *= 4.0 / np.linalg.norm(u, axis=-1, keepdims=True)
    block_topic = rng.integers(0, topics, (batch, kv_heads, seq // key_block))
    k = np.take_along_axis(u, block_topic[..., None], 2)                  # [B, K, nR, H]
    k = np.repeat(k, key_block, axis=2).transpose(0, 2, 1, 3) + rng.normal(size=(batch, seq, kv_heads, head_dim))
    changes = rng.random((batch, seq)) < 1.0 / segment
    seg = np.cumsum(changes, axis=1)
    q_topic = rng.integers(0, topics, (batch, heads, seq + 1))
    q_topic = np.take_along_axis(q_topic, np.broadcast_to(seg[:, None], (batch, heads, seq)), 2)
    group = heads // kv_heads
    q = np.stack([u[np.arange(batch)[:, None], h // group, q_topic[:, h]] for h in range(heads)], 2)
    q = q + rng.normal(size=q.shape)
    # Planted relevance: the earlier blocks of each (token, head) whose topic is the query's.
    block_of = np.repeat(block_topic, group, axis=1)[:, :, None, :]       # [B, N, 1, nR]
    earlier = np.arange(seq // key_block)[None, :] < (np.arange(seq) // key_block)[:, None]
    relevant = (block_of == q_topic[..., None]) & earlier                 # [B, N, T, nR]
    return q.astype(np.float32), k.astype(np.float32), relevant
