"""Helpers shared by the exported attention methods (pure PyTorch; copied into every sparse export)."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import repeat_kv


def softmax_attention(q, k, v, allowed, scaling):
    """Softmax attention over allowed keys; q [B, N, T, H], k/v [B, K, S, H], allowed bool
    broadcastable to [B, N, T, S]. Rows with no allowed key (left padding) give 0, not NaN."""
    groups = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, repeat_kv(v, groups)).transpose(1, 2)   # [B, T, N, H]


def key_positions(positions, seq_kv):
    """[B or 1, S]: the keys end at the last query position (cached keys precede it)."""
    return positions[:, -1:] - (seq_kv - 1) + torch.arange(seq_kv, device=positions.device)


def with_padding(allowed, attention_mask, seq_kv):
    """Also respect transformers' 4-D mask (bool, or additive float with 0 = visible)."""
    if attention_mask is None:
        return allowed
    mask = attention_mask[..., :seq_kv]
    return allowed & (mask if mask.dtype == torch.bool else mask == 0)
