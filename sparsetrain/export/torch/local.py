"""sparsetrain `method="local"` in PyTorch: a fixed window of whole blocks plus sink blocks."""

from __future__ import annotations

from torch import nn

from .attention_common import key_positions, softmax_attention, with_padding


class LocalBlockAttention(nn.Module):
    """Fixed block pattern (sparsetrain `method="local"`): query position p sees key position j iff
    j <= p and (j // bs > p // bs - local_blocks or j // bs < initial_blocks)."""

    def __init__(self, config, spec: dict):
        super().__init__()
        self.block_size = int(spec["block_size"])
        self.local_blocks = int(spec["local_blocks"])
        self.initial_blocks = int(spec["initial_blocks"])

    def forward(self, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
        del q_raw, k_raw, hidden
        q_pos = positions[:, None, :, None]                           # [B, 1, T, 1]
        k_pos = key_positions(positions, k.shape[2])[:, None, None, :]  # [B, 1, 1, S]
        q_blk, k_blk = q_pos // self.block_size, k_pos // self.block_size
        window = (k_blk > q_blk - self.local_blocks) | (k_blk < self.initial_blocks)
        allowed = (k_pos <= q_pos) & (k_pos >= 0) & window
        return softmax_attention(q, k, v, with_padding(allowed, attention_mask, k.shape[2]), scaling)


ATTENTION = LocalBlockAttention
