"""sparsetrain `method="dma"` in PyTorch: Dynamic Mask Attention on key blocks.

The same math as sparsetrain/sparse/dma.py (read its docstring), from the definitions: the key
bias b = A * softplus(v W_delta) per kv head and key is added to the logits; each query tile of
`block_size` positions keeps its forced blocks (the first `initial_blocks`, the last
`local_blocks` up to its own) and the causal blocks of highest block-max bias, `window //
block_size` in all (ties to the lower block). The bias needs only the values, so decoding with a
KV cache reads it from the cached values.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_common import (block_max, fill_blocks, forced_blocks, key_positions, key_score_bias,
                               softmax_attention, token_mask, with_padding)


class DmaAttention(nn.Module):
    def __init__(self, config, spec: dict):
        super().__init__()
        for name in ("block_size", "local_blocks", "initial_blocks", "window"):
            setattr(self, name, int(spec[name]))
        self.logit_bias = bool(spec["logit_bias"])
        kv, n = config.num_key_value_heads, config.num_attention_heads
        h = getattr(config, "head_dim", None) or config.hidden_size // n
        self.group = n // kv
        # A starts at 0 (as in training); transformers' _init_weights does not know these.
        self.key_score_scale = nn.Parameter(torch.zeros(kv))
        self.key_score_proj = nn.Parameter(torch.randn(kv * h, kv) * 0.02)

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del q_raw, k_raw, hidden
        b, seq, bs = q.shape[0], k.shape[2], self.block_size
        q_pos = positions.expand(b, -1)                                     # [B, T]
        k_pos = key_positions(positions, seq).expand(b, -1)                 # [B, S]
        bias = key_score_bias(v, self.key_score_scale, self.key_score_proj)  # [B, K, S]
        scores = block_max(bias, k_pos, bs)                                 # [B, K, nK]
        n_k = scores.shape[-1]
        tiles = torch.arange(n_k, device=q.device)
        valid = tiles[None, :] <= tiles[:, None]                            # query tile i, key block j
        forced = forced_blocks(valid, self.initial_blocks, self.local_blocks)
        kept = fill_blocks(forced, scores[:, :, None, :], valid, self.window // bs)   # [B, K, nQ, nK]
        allowed = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & token_mask(kept, q_pos, k_pos, bs, bs)
        allowed = with_padding(allowed.repeat_interleave(self.group, 1), attention_mask, seq)
        return softmax_attention(q, k, v, allowed, scaling, key_bias=bias if self.logit_bias else None)


ATTENTION = DmaAttention
