"""sparsetrain `method="infllm_v2"` in PyTorch: InfLLM-V2 block selection per query token (or per
query tile), shared per KV head, dense below `dense_len`.

The same math as sparsetrain/sparse/infllm_v2.py (read its docstring for the method and its
granularities), written directly from the definitions: fine and coarse compressed keys are the means
of the post-RoPE keys over complete windows; a token's score of a fine window is the sum over its
GQA group of exp(q . k1 * scaling - lse), with lse the log-sum-exp over the coarse windows it has
seen; a key block scores the max over the fine windows overlapping it (with granularity "tile",
tile i is scored with the sum over the tokens of tile i-1); per row, `initial_blocks` and the
`local_blocks` ending at the diagonal are forced and the best others fill `topk` blocks in all (ties
to the lower index). Query positions below `dense_len` attend densely, so a cache of at most
`dense_len` keys runs plain dense attention.

Decoding with a KV cache: the keys come from the cache; scoring needs the post-RoPE queries of
earlier tokens, which the layer keeps for the sequence being decoded (a forward whose first position
is 0 starts a new sequence; positions must be contiguous from 0).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_common import (SequenceHistory, key_positions, lag_blocks, ranked, softmax_attention,
                               token_mask, with_padding)


def window_means(k, size: int, stride: int):
    """[B, K, S, H] -> float32 [B, K, nW, H]: means over the complete windows (size, stride)."""
    n = max(0, (k.shape[2] - size) // stride + 1)
    idx = torch.arange(n, device=k.device)[:, None] * stride + torch.arange(size, device=k.device)
    return k.float()[:, :, idx].mean(3)


class InfllmV2Attention(nn.Module):
    def __init__(self, config, spec: dict):
        super().__init__()
        for name in ("block_size", "local_blocks", "initial_blocks", "kernel_size", "kernel_stride",
                     "coarse_size", "coarse_stride", "topk", "dense_len"):
            setattr(self, name, int(spec[name]))
        self.granularity = spec["granularity"]
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.history = SequenceHistory()   # post-RoPE queries [B, N, S, H] of this sequence

    def token_scores(self, q_all, k_all, scaling):
        """float32 [B, K, S, nK]: each token's score of each key block (tokens at 0..S-1)."""
        b, n, s, h = q_all.shape
        kv = k_all.shape[1]
        qg = q_all.float().view(b, kv, self.group, s, h)
        t = torch.arange(s, device=q_all.device)[:, None]

        def logits_and_seen(size, stride):
            keys = window_means(k_all, size, stride)                                 # [B, K, nW, H]
            seen = torch.arange(keys.shape[2], device=q_all.device) * stride + size - 1 <= t
            return torch.einsum("bkgsh,bkwh->bkgsw", qg, keys) * scaling, seen

        coarse, coarse_seen = logits_and_seen(self.coarse_size, self.coarse_stride)
        lse = torch.logsumexp(coarse.masked_fill(~coarse_seen, -torch.inf), -1, keepdim=True)
        fine, fine_seen = logits_and_seen(self.kernel_size, self.kernel_stride)
        has_lse = torch.isfinite(lse)
        p = torch.exp(fine - torch.where(has_lse, lse, torch.zeros_like(lse)))
        p = torch.where(fine_seen & has_lse, p, torch.zeros_like(p)).sum(2)           # [B, K, S, nW]
        n_k = -(-s // self.block_size)
        start = torch.arange(p.shape[-1], device=p.device) * self.kernel_stride
        block = torch.arange(n_k, device=p.device)[:, None] * self.block_size
        overlap = (start < block + self.block_size) & (start + self.kernel_size > block)  # [nK, nW]
        return torch.where(overlap, p[..., None, :], torch.zeros_like(p[..., None, :])).amax(-1)

    def selection(self, q_all, k_all, scaling):
        """bool [B, K, rows, nK]: each row's key blocks; rows are the query tokens, or the tiles
        (scored with the previous tile's tokens) with granularity "tile"."""
        bs = self.block_size
        scores = self.token_scores(q_all, k_all, scaling)
        s, n_k = scores.shape[2], scores.shape[3]
        last = torch.arange(s, device=scores.device)                        # each row's last position
        if self.granularity == "tile":
            pad = n_k * bs - s
            scores = lag_blocks(torch.nn.functional.pad(scores, (0, 0, 0, pad)).view(*scores.shape[:2], n_k, bs, n_k).sum(3))
            last = (torch.arange(n_k, device=scores.device) + 1) * bs - 1
        i = (last // bs)[:, None]
        j = torch.arange(n_k, device=scores.device)[None, :]
        valid = j <= i
        forced = valid & ((j < self.initial_blocks) | (j > i - self.local_blocks))
        rest = torch.where(valid & ~forced, scores, -torch.inf)
        order = ranked(rest)
        room = self.topk - forced.sum(-1, keepdim=True)
        take = (j < room) & (torch.gather(rest, -1, order) > -torch.inf)
        picked = torch.zeros_like(valid.expand_as(rest)).scatter(-1, order, take)
        return forced | picked | ((last < self.dense_len)[:, None] & valid)

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del q_raw, k_raw, hidden
        seq = k.shape[2]
        q_all = self.history.queries(positions, q, seq, "infllm_v2")
        q_pos = positions.expand(q.shape[0], -1)                            # [B, T]
        k_pos = key_positions(positions, seq).expand(q.shape[0], -1)        # [B, S]
        allowed = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
        if seq > self.dense_len:
            rows = self.block_size if self.granularity == "tile" else 1
            kept = token_mask(self.selection(q_all, k, scaling), q_pos, k_pos, rows, self.block_size)
            allowed = allowed & kept.repeat_interleave(self.group, 1)
        return softmax_attention(q, k, v, with_padding(allowed, attention_mask, seq), scaling)


ATTENTION = InfllmV2Attention
