"""sparsetrain `method="seer"` in PyTorch: SeerAttention block gates choose the key blocks.

The same math as sparsetrain/sparse/seer.py (read its docstring for the method and its deviations
from the paper): per block of `block_size` tokens, average-pooled pre-RoPE queries and
max/min/avg-pooled pre-RoPE keys go through per-head linear maps (`q_gate` [N, H, E],
`k_gate` [N, 3H, E]), get RoPE with head dim E at each block's first position, and their scaled
dot products are the gate logits of (query block, key block). Each query block keeps the selected
key blocks plus the forced ones (the last `local_blocks`, the first `initial_blocks`); inside kept
blocks attention is causal.

Decoding with a KV cache: the gate needs the pre-RoPE queries and keys of earlier tokens, which the
KV cache does not hold, so the layer keeps them itself for the sequence being decoded; a forward
whose first position is 0 starts a new sequence. Positions must be contiguous from 0 (block i
starts at position i * block_size), as in sparsetrain's training. With `query_pool="lagged"` (the
default) each token's selection depends only on earlier blocks, so cached decoding reproduces the
full forward exactly; the paper's `query_pool="block"` pools a block's own queries and so matches
only forwards that see whole blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention_common import (SequenceHistory, forced_blocks, gate_rope, key_positions, lag_blocks, pool_blocks,
                               ranked, rope, softmax_attention, token_mask, with_padding)


class SeerAttention(nn.Module):
    def __init__(self, config, spec: dict):
        super().__init__()
        self.spec = spec
        heads, head_dim = config.num_attention_heads, config.head_dim
        self.d_gate = min(int(spec["d_gate"]), head_dim)
        self.group = heads // config.num_key_value_heads
        self.config = config   # for gate_rope, computed per call: tensors built here may be on "meta"
        # Loaded from sparse_attention.safetensors; the initialiser only keeps the module usable.
        self.q_gate = nn.Parameter(torch.randn(heads, head_dim, self.d_gate) * 0.02)
        self.k_gate = nn.Parameter(torch.randn(heads, 3 * head_dim, self.d_gate) * 0.02)
        self.history = SequenceHistory()   # pre-RoPE queries [B, N, S, H] and keys [B, K, S, H]

    def gate_logits(self, q_all, k_all):
        """[B, N, nB, nB] float32, -inf outside each row's candidate blocks."""
        bs, lagged = int(self.spec["block_size"]), self.spec["query_pool"] == "lagged"
        q_pool = pool_blocks(q_all, bs, ("avg",))                            # [B, N, nB, H]
        if lagged:
            q_pool = lag_blocks(q_pool)
        k_pool = pool_blocks(k_all, bs, ("max", "min", "avg")).repeat_interleave(self.group, 1)
        n = q_pool.shape[2]
        starts, freqs = torch.arange(n, device=q_all.device) * bs, gate_rope(self.config, self.d_gate)
        q_hat = rope(torch.einsum("bnqh,nhe->bnqe", q_pool, self.q_gate.float()), starts, *freqs)
        k_hat = rope(torch.einsum("bnkf,nfe->bnke", k_pool, self.k_gate.float()), starts, *freqs)
        logits = torch.einsum("bnqe,bnke->bnqk", q_hat, k_hat) / math.sqrt(self.d_gate)
        i, j = torch.arange(n, device=q_all.device)[:, None], torch.arange(n, device=q_all.device)[None, :]
        return logits.masked_fill(~((j < i) if lagged else (j <= i)), -torch.inf)

    def select(self, logits):
        """bool [B, Hs, nB, nB]: each query block's kept key blocks."""
        s = self.spec
        n = logits.shape[-1]
        i, j = torch.arange(n, device=logits.device)[:, None], torch.arange(n, device=logits.device)[None, :]
        valid = (j <= i).expand(logits.shape)
        forced = forced_blocks(valid, int(s["initial_blocks"]), int(s["local_blocks"]))
        finite = torch.isfinite(logits)
        probs = torch.softmax(torch.where(finite, logits, -1e30), -1).masked_fill(~finite, 0.0)
        if s["select"] in ("topk", "density"):
            if s["select"] == "topk":
                budget = torch.full(logits.shape[:-1], int(s["topk"]), device=logits.device)
            else:
                budget = torch.clamp(torch.ceil(float(s["target_density"]) * valid.sum(-1)), min=1)
            rest = torch.where(valid & ~forced, logits, -torch.inf)
            order = ranked(rest)
            room = budget[..., None] - forced.sum(-1, keepdim=True)
            take = (torch.arange(n, device=logits.device) < room) & (torch.gather(rest, -1, order) > -torch.inf)
            return forced | torch.zeros_like(valid).scatter(-1, order, take)
        if s["select"] == "threshold":
            return forced | (valid & (probs > float(s["threshold"])))
        key = torch.where(forced, torch.inf, torch.where(valid, probs, -torch.inf))
        order = ranked(key)
        mass = torch.gather(torch.where(valid, probs, 0.0), -1, order)
        keep = torch.gather(valid, -1, order) & (torch.cumsum(mass, -1) - mass < float(s["topp"]))
        return forced | torch.zeros_like(valid).scatter(-1, order, keep)

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del hidden
        q_pos = positions.expand(q.shape[0], -1)                            # [B, T]
        k_pos = key_positions(positions, k.shape[2]).expand(q.shape[0], -1)  # [B, S]
        causal = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
        if self.spec["mode"] == "distill":
            # Gates still being distilled: the layer's output is dense, as in sparsetrain.
            return softmax_attention(q, k, v, with_padding(causal, attention_mask, k.shape[2]), scaling)
        q_all, k_all = self.history.update(positions, q_raw, k_raw)
        if k_all.shape[2] != k.shape[2]:
            raise ValueError(f"seer layer: {k_all.shape[2]} remembered keys but {k.shape[2]} cached; "
                             f"start each sequence at position 0")
        logits = self.gate_logits(q_all, k_all)
        if self.spec["share_kv_heads"]:
            b, n = logits.shape[:2]
            logits = logits.view(b, n // self.group, self.group, *logits.shape[2:]).mean(2)
        kept = self.select(logits)                                          # [B, Hs, nB, nB]
        if self.spec["share_kv_heads"]:
            kept = kept.repeat_interleave(self.group, 1)
        bs = int(self.spec["block_size"])
        allowed = token_mask(kept, q_pos, k_pos, bs, bs) & causal
        return softmax_attention(q, k, v, with_padding(allowed, attention_mask, k.shape[2]), scaling)


ATTENTION = SeerAttention
