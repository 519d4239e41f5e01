"""sparsetrain `method="moba"` in PyTorch: Mixture of Block Attention, routed per query token (or
per query tile).

The same math as sparsetrain/sparse/moba.py (read its docstring for the method and its
granularities): the gate of a query token (or of a tile of `block_size` tokens, by its pooled
query) and a routing block (`moba_block` tokens) is the raw float32 dot product of the post-RoPE
query with the block's mean post-RoPE key, per query head. Each row keeps its current routing block
(causally) and the `topk - 1` best strictly earlier blocks (ties to the lower index); rows in tiles
from floor((1 - dense_last_fraction) * nQ) on, with nQ the tiles of the sequence so far, attend
densely.

Decoding with a KV cache: the keys come from the cache, but routing needs the post-RoPE queries of
earlier tokens, which the cache does not hold, so the layer keeps them itself for the sequence being
decoded; a forward whose first position is 0 starts a new sequence. Positions must be contiguous
from 0. Per-token routing decodes exactly. With tiles and `query_pool="lagged"` a tile is routed with the previous tile's queries,
so cached decoding reproduces the full forward exactly; `query_pool="tile"` pools a tile's own
queries and so matches only forwards that see whole tiles (or tiles that are dense anyway).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention_common import (SequenceHistory, key_positions, lag_blocks, pool_blocks, ranked,
                               softmax_attention, token_mask, with_padding)


class MobaAttention(nn.Module):
    def __init__(self, config, spec: dict):
        super().__init__()
        self.block_size, self.moba_block = int(spec["block_size"]), int(spec["moba_block"])
        self.local_blocks, self.initial_blocks = int(spec["local_blocks"]), int(spec["initial_blocks"])
        self.topk = int(spec["topk"])
        self.dense_last_fraction = float(spec["dense_last_fraction"])
        self.per_token = spec["granularity"] == "token"
        self.lagged = spec["query_pool"] == "lagged"
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.history = SequenceHistory()   # post-RoPE queries [B, N, S, H] of this sequence

    def routing(self, q_all, k_all):
        """bool [B, N, rows, nR]: each query token's (or tile's) selected routing blocks, its current
        one included."""
        rows = 1 if self.per_token else self.block_size
        q_pool = q_all.float() if self.per_token else pool_blocks(q_all, self.block_size)   # [B, N, rows, H]
        if self.lagged and not self.per_token:
            q_pool = lag_blocks(q_pool)
        k_mean = pool_blocks(k_all, self.moba_block).repeat_interleave(self.group, 1)   # [B, N, nR, H]
        scores = torch.einsum("bnqh,bnrh->bnqr", q_pool, k_mean)
        n_q, n_r = scores.shape[-2:]
        current = (torch.arange(n_q, device=scores.device) * rows // self.moba_block)[:, None]
        j = torch.arange(n_r, device=scores.device)[None, :]
        earlier = torch.where(j < current, scores, -torch.inf)
        order = ranked(earlier)
        take = (torch.arange(n_r, device=scores.device) < self.topk - 1) & \
            (torch.gather(earlier, -1, order) > -torch.inf)
        return (j == current) | torch.zeros_like(earlier, dtype=torch.bool).scatter(-1, order, take)

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del q_raw, k_raw, hidden
        seq = k.shape[2]
        q_all = self.history.queries(positions, q, seq, "moba")
        bs = self.block_size
        q_pos = positions.expand(q.shape[0], -1)                            # [B, T]
        k_pos = key_positions(positions, seq).expand(q.shape[0], -1)        # [B, S]
        causal = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
        allowed = token_mask(self.routing(q_all, k), q_pos, k_pos, 1 if self.per_token else bs, self.moba_block)
        q_tile, k_tile = (q_pos // bs)[:, None, :, None], (k_pos // bs)[:, None, None, :]
        first_dense = math.floor((1.0 - self.dense_last_fraction) * -(-seq // bs))
        forced = (k_tile > q_tile - self.local_blocks) | (k_tile < self.initial_blocks)
        allowed = (allowed | forced | (q_tile >= first_dense)) & causal
        return softmax_attention(q, k, v, with_padding(allowed, attention_mask, seq), scaling)


ATTENTION = MobaAttention
