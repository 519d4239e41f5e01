"""sparsetrain `method="dsa"` in PyTorch: DeepSeek Sparse Attention, the lightning indexer choosing
`topk` keys per query token for all heads of the layer.

The same math as sparsetrain/sparse/dsa.py and dsa_indexer.py (read their docstrings for the method
and its deviations from the paper), written from the definitions: from the layer's normalised input
x, indexer queries q[t, j] = x_t W_q (J heads of E channels), one key per token k[s] =
LayerNorm(x_s W_k) (eps 1e-6), RoPE on the first `index_rope_dim` channels of both, head weights
w[t, j] = x_t W_w / sqrt(J E), and scores I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) over keys
s <= t. Each token keeps its `topk` best keys (ties to the earlier key); with candidates="blocks"
(HISA) only the keys of its `candidate_blocks` best blocks (scored by their mean key; the first
`initial_blocks` and the `local_blocks` ending at its own block forced) compete. "warmup" layers, and
any forward with at most `dense_len` keys, attend densely.

Decoding with a KV cache: the indexer's keys of earlier tokens are not in the cache, so the layer
keeps them for the sequence being decoded (a forward whose first position is 0 starts a new
sequence; positions must be contiguous from 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention_common import (SequenceHistory, fill_blocks, forced_blocks, gate_rope, keep_top, key_positions,
                               pool_blocks, rope, softmax_attention, with_padding)

LAYER_NORM_EPS = 1e-6


class DsaAttention(nn.Module):
    def __init__(self, config, spec: dict):
        super().__init__()
        self.mode, self.candidates = spec["mode"], spec["candidates"]
        for name in ("topk", "dense_len", "index_heads", "index_dim", "index_rope_dim", "candidate_blocks",
                     "block_size", "initial_blocks", "local_blocks"):
            setattr(self, name, int(spec[name]))
        self.config = config   # for gate_rope, computed per call: tensors built here may be on "meta"
        d, j, e = config.hidden_size, self.index_heads, self.index_dim
        # Loaded from sparse_attention.safetensors; the initialiser only keeps the module usable.
        self.index_q = nn.Parameter(torch.randn(d, j, e) * 0.02)
        self.index_k = nn.Parameter(torch.randn(d, e) * 0.02)
        self.index_k_scale = nn.Parameter(torch.ones(e))
        self.index_k_bias = nn.Parameter(torch.zeros(e))
        self.index_weights = nn.Parameter(torch.randn(d, j) * 0.02)
        self.history = SequenceHistory()   # indexer keys [B, 1, S, E] of this sequence

    def partial_rope(self, x, positions):
        """RoPE on the first index_rope_dim channels of x [B, M, n, E] at positions [B, n]."""
        r = self.index_rope_dim
        if r == 0:
            return x
        return torch.cat([rope(x[..., :r], positions, *gate_rope(self.config, r)), x[..., r:]], dim=-1)

    def indexer(self, hidden, positions):
        """(q [B, J, T, E], k [B, 1, T, E], w [B, J, T, 1]) of the current tokens, float32."""
        x = hidden.float()
        q = self.partial_rope(torch.einsum("btd,dje->bjte", x, self.index_q.float()), positions)
        k = torch.nn.functional.layer_norm(x @ self.index_k.float(), (self.index_dim,), self.index_k_scale.float(),
                                           self.index_k_bias.float(), LAYER_NORM_EPS)
        k = self.partial_rope(k[:, None], positions)
        w = (x @ self.index_weights.float()).transpose(1, 2)[..., None] / math.sqrt(self.index_dim * self.index_heads)
        return q, k, w

    @staticmethod
    def scores(q, w, k):
        """[B, T, S]: sum_j w ReLU(q_j . k) of queries q [B, J, T, E] against keys k [B, 1, S, E]."""
        return (w * torch.relu(q @ k.transpose(2, 3))).sum(1)

    def candidate_keys(self, q, w, k_all, q_pos, k_pos):
        """bool [B, T, S]: the keys of each token's HISA candidate blocks."""
        bs = self.block_size
        blocks = self.scores(q, w, pool_blocks(k_all, bs)).float()             # [B, T, nB]
        n = blocks.shape[-1]
        valid = torch.arange(n, device=q.device) <= (q_pos // bs)[..., None]
        forced = forced_blocks(valid, self.initial_blocks, self.local_blocks)
        kept = fill_blocks(forced, blocks, valid, self.candidate_blocks)
        return kept.gather(2, (k_pos // bs)[:, None, :].expand(-1, q_pos.shape[1], -1))

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del q_raw, k_raw
        seq = k.shape[2]
        q_pos = positions.expand(q.shape[0], -1)                            # [B, T]
        k_pos = key_positions(positions, seq).expand(q.shape[0], -1)        # [B, S]
        allowed = k_pos[:, None, :] <= q_pos[:, :, None]                    # [B, T, S]
        if self.mode == "sparse":
            iq, ik, iw = self.indexer(hidden, q_pos)
            (k_all,) = self.history.update(positions, ik)
            if k_all.shape[2] != seq:
                raise ValueError(f"dsa layer: {k_all.shape[2]} remembered indexer keys but {seq} cached keys; "
                                 f"start each sequence at position 0")
            if seq > self.dense_len:
                candidates = allowed
                if self.candidates == "blocks":
                    candidates = candidates & self.candidate_keys(iq, iw, k_all, q_pos, k_pos)
                index = torch.where(candidates, self.scores(iq, iw, k_all), -torch.inf)
                allowed = allowed & keep_top(index, self.topk)
        return softmax_attention(q, k, v, with_padding(allowed[:, None], attention_mask, seq), scaling)


ATTENTION = DsaAttention
