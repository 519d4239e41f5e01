"""sparsetrain `method="nosa"` in PyTorch: InfLLM-V2's query-aware blocks, the rest of the budget by
a learned eviction score, which is also the logits' key bias.

The same math as sparsetrain/sparse/nosa.py (read its docstring), from the definitions: per query
tile, InfLLM-V2's tile selection (infllm_v2.py, shipped beside this file) with a budget of
`initial_blocks + local_blocks + query_topk` blocks; then the causal blocks of highest block-max
eviction score c = A * softplus(v W_delta) fill it up to `topk` (ties to the lower block); c is
added to the logits of the kept keys. Decoding with a KV cache keeps the queries of the sequence,
as InfLLM-V2 does; c needs only the cached values.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_common import (block_max, fill_blocks, key_positions, key_score_bias, softmax_attention,
                               token_mask, with_padding)
from .infllm_v2 import InfllmV2Attention


class NosaAttention(InfllmV2Attention):
    def __init__(self, config, spec: dict):
        super().__init__(config, spec)
        # InfLLM-V2's selection here is NOSA's query-aware part: its budget, not the whole one.
        self.budget = self.topk
        self.topk = self.initial_blocks + self.local_blocks + int(spec["query_topk"])
        self.logit_bias = bool(spec["logit_bias"])
        kv = config.num_key_value_heads
        h = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # A starts at 0 (as in training); transformers' _init_weights does not know these.
        self.key_score_scale = nn.Parameter(torch.zeros(kv))
        self.key_score_proj = nn.Parameter(torch.randn(kv * h, kv) * 0.02)

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del q_raw, k_raw, hidden
        b, seq, bs = q.shape[0], k.shape[2], self.block_size
        q_all = self.history.queries(positions, q, seq, "nosa")
        q_pos = positions.expand(b, -1)                                     # [B, T]
        k_pos = key_positions(positions, seq).expand(b, -1)                 # [B, S]
        bias = key_score_bias(v, self.key_score_scale, self.key_score_proj)  # [B, K, S]
        chosen = self.selection(q_all, k, scaling)                          # [B, K, nQ, nK] query-aware
        tiles = torch.arange(chosen.shape[-1], device=q.device)
        valid = tiles[None, :] <= tiles[:, None]
        kept = fill_blocks(chosen, block_max(bias, k_pos, bs)[:, :, None, :], valid, self.budget)
        allowed = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & token_mask(kept, q_pos, k_pos, bs, bs)
        allowed = with_padding(allowed.repeat_interleave(self.group, 1), attention_mask, seq)
        return softmax_attention(q, k, v, allowed, scaling, key_bias=bias if self.logit_bias else None)


ATTENTION = NosaAttention
