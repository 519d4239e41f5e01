"""sparsetrain `method="nsa"` in PyTorch: Native Sparse Attention's compression, selection and
sliding-window branches mixed by sigmoid gates, in plain (eager) PyTorch.

The same math as sparsetrain/sparse/nsa.py (read its docstring), written from the definitions with
explicit masks: compressed token i (window [i*stride, i*stride + kernel_size)) is phi of its window
(pre-RoPE keys, with the intra-block position embedding for keys), roped at position i*stride and
visible to a query at p iff p >= i*stride + kernel_size - 1; a selection block's importance is the
compression probabilities, summed over the GQA group, times the stride segments it shares with each
window; per token the first `initial_blocks` and the last `local_blocks` causal blocks are forced
and the best others fill `topk` (ties to the lower index); the window is the last `window` keys.

Decoding with a KV cache: the layer keeps, for the sequence being decoded, the per-token tensors
its branches need beyond transformers' cache (compression keys before RoPE and values, window keys
and values), and its compressed keys and values, which grow by one compressed token each time a
window completes (computed once, never recomputed). A forward whose first position is 0 starts a
new sequence; positions must be contiguous from 0.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from .attention_common import SequenceHistory, key_positions, ranked, softmax_attention, with_padding

PROJECTIONS = ("k_cmp_proj", "v_cmp_proj", "k_win_proj", "v_win_proj")


def compress(x, kind: str, size: int, stride: int, first: int, count: int, phi: dict):
    """Compressed tokens first .. first+count-1 of x [B, K, S, H] (pre-RoPE): [B, K, count, H]."""
    index = (torch.arange(first, first + count, device=x.device)[:, None] * stride
             + torch.arange(size, device=x.device)[None, :])
    win = x[:, :, index]                                                   # [B, K, count, size, H]
    phi = {name: p.to(x.dtype) for name, p in phi.items()}
    if kind == "mean":
        return win.mean(3)
    if "position" in phi:
        win = win + phi["position"][None, :, None]                         # [K, size, H] per window
    b, k, n, _, h = win.shape
    flat = win.reshape(b, k, n, size * h)                                  # token-major, as in JAX
    if kind == "linear":
        return torch.einsum("bknf,kfh->bknh", flat, phi["w"])
    hidden = nn.functional.silu(torch.einsum("bknf,kfm->bknm", flat, phi["w1"]))
    return torch.einsum("bknm,kmh->bknh", hidden, phi["w2"])


class NsaAttention(nn.Module):
    def __init__(self, config, spec: dict):
        super().__init__()
        for name in ("block_size", "local_blocks", "initial_blocks", "kernel_size", "kernel_stride",
                     "compressor_hidden", "topk", "window"):
            setattr(self, name, int(spec[name]))
        self.compressor, self.separate_kv = spec["compressor"], bool(spec["separate_kv"])
        d, n, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        h = getattr(config, "head_dim", None) or d // n
        self.group = n // kv
        param = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.02)   # transformers' init skips these
        self.gate = param(d, n, 3)
        if self.separate_kv:
            for name in PROJECTIONS:
                setattr(self, name, param(d, kv, h))
        flat = self.kernel_size * h
        for kind in ("k", "v"):
            shapes = {"mean": {}, "linear": {"w": (kv, flat, h)},
                      "mlp": {"w1": (kv, flat, self.compressor_hidden), "w2": (kv, self.compressor_hidden, h)}}
            shapes = dict(shapes[self.compressor])
            if kind == "k" and self.compressor != "mean":
                shapes["position"] = (kv, self.kernel_size, h)
            for name, shape in shapes.items():
                setattr(self, f"{kind}_phi_{name}", param(*shape))
        self.rotary = LlamaRotaryEmbedding(config)
        self.history = SequenceHistory()     # per-token branch tensors [B, K, S, H] of this sequence
        self.compressed = None               # (keys after RoPE, values) [B, K, I, H] of this sequence

    def phi(self, kind: str) -> dict:
        """The key ("k") or value ("v") compressor's weights, by their names in `compress`."""
        prefix = f"{kind}_phi_"
        return {name[len(prefix):]: p for name, p in self.named_parameters() if name.startswith(prefix)}

    def rope(self, x, positions):
        """x [B, K, M, H] roped at positions [B or 1, M]."""
        cos, sin = self.rotary(x, positions)
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    def project(self, hidden, name):
        return torch.einsum("btd,dkh->bkth", hidden, getattr(self, name).to(hidden.dtype))

    def branch_tensors(self, k, v, k_raw, hidden, positions):
        """This forward's compression keys (pre-RoPE) and values, window keys (roped) and values."""
        t = hidden.shape[1]
        if not self.separate_kv:
            return k_raw, v[:, :, -t:], k[:, :, -t:], v[:, :, -t:]
        k_win = self.rope(self.project(hidden, "k_win_proj"), positions)
        return (self.project(hidden, "k_cmp_proj"), self.project(hidden, "v_cmp_proj"), k_win,
                self.project(hidden, "v_win_proj"))

    def compressed_kv(self, k_cmp, v_cmp, new_sequence: bool):
        """The sequence's compressed keys (roped) and values, extended by the windows completed since
        the last call."""
        seq = k_cmp.shape[2]
        total = max(0, (seq - self.kernel_size) // self.kernel_stride + 1)
        have = 0 if new_sequence or self.compressed is None else self.compressed[0].shape[2]
        if total > have:
            args = (self.kernel_size, self.kernel_stride, have, total - have)
            kc = compress(k_cmp.float(), self.compressor, *args, self.phi("k"))
            vc = compress(v_cmp.float(), self.compressor, *args, self.phi("v"))
            start = torch.arange(have, total, device=k_cmp.device)[None] * self.kernel_stride
            kc = self.rope(kc, start)                                      # at each window's start
            if have:
                kc, vc = (torch.cat([old, new], 2) for old, new in zip(self.compressed, (kc, vc)))
            self.compressed = (kc, vc)
        elif new_sequence or self.compressed is None:
            b, kv, _, h = k_cmp.shape
            self.compressed = (k_cmp.new_zeros(b, kv, 0, h).float(),) * 2
        return self.compressed

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del q_raw
        b, n, t, h = q.shape
        seq = k.shape[2]
        new_sequence = int(positions[0, 0]) == 0
        k_cmp, v_cmp, k_win, v_win = self.history.update(
            positions, *self.branch_tensors(k, v, k_raw, hidden, positions))
        if k_cmp.shape[2] != seq:
            raise ValueError(f"nsa layer: {k_cmp.shape[2]} remembered tokens but {seq} cached keys; "
                             f"start each sequence at position 0")
        kc, vc = self.compressed_kv(k_cmp, v_cmp, new_sequence)
        q_pos = positions.expand(b, -1)                                    # [B, T]
        k_pos = key_positions(positions, seq).expand(b, -1)                # [B, S]
        causal = k_pos[:, None, None, :] <= q_pos[:, None, :, None]        # [B, 1, T, S]

        # Compression branch, and the importance of each selection block.
        n_cmp = kc.shape[2]
        start = torch.arange(n_cmp, device=q.device) * self.kernel_stride
        seen = (start + self.kernel_size - 1)[None, None, None, :] <= q_pos[:, None, :, None]   # [B, 1, T, I]
        qg = q.float().view(b, n // self.group, self.group, t, h)
        logits = torch.einsum("bkgth,bkih->bkgti", qg, kc) * scaling
        probs = torch.softmax(logits.masked_fill(~seen[:, :, None], float("-inf")), -1).nan_to_num(0.0)
        compressed = torch.einsum("bkgti,bkih->btkgh", probs, vc).reshape(b, t, n, h)
        n_blocks = -(-seq // self.block_size)
        block = torch.arange(n_blocks, device=q.device)
        shared = (torch.minimum(start[:, None] + self.kernel_size, (block[None, :] + 1) * self.block_size)
                  - torch.maximum(start[:, None], block[None, :] * self.block_size)).clamp(min=0)
        scores = torch.einsum("bkti,ij->bktj", probs.sum(2), (shared // self.kernel_stride).float())

        # Selection branch: forced blocks, then the best others, per token and kv head.
        i = (q_pos // self.block_size)[:, None, :, None]                   # [B, 1, T, 1]
        valid = block <= i
        forced = valid & ((block < self.initial_blocks) | (block > i - self.local_blocks))
        rest = torch.where(valid & ~forced, scores, float("-inf"))
        order = ranked(rest)
        room = self.topk - forced.sum(-1, keepdim=True)
        take = (block < room) & (torch.gather(rest, -1, order) > float("-inf"))
        kept = forced | torch.zeros_like(rest, dtype=torch.bool).scatter(-1, order, take)   # [B, K, T, nK]
        in_kept = kept.gather(3, (k_pos // self.block_size)[:, None, None, :].expand(-1, kept.shape[1], t, -1))
        allowed = with_padding(causal & in_kept.repeat_interleave(self.group, 1), attention_mask, seq)
        selected = softmax_attention(q, k, v, allowed, scaling)

        # Sliding window over the window branch's keys.
        band = causal & (k_pos[:, None, None, :] > q_pos[:, None, :, None] - self.window)
        windowed = softmax_attention(q, k_win.to(q.dtype), v_win.to(q.dtype),
                                     with_padding(band, attention_mask, seq), scaling)

        gates = torch.sigmoid(torch.einsum("btd,dnc->btnc", hidden.float(), self.gate))   # [B, T, N, 3]
        out = sum(gates[..., c, None] * part.float() for c, part in enumerate((compressed, selected, windowed)))
        return out.to(q.dtype)


ATTENTION = NsaAttention
