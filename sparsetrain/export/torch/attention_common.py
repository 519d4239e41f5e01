"""Helpers shared by the exported attention methods (pure PyTorch; copied into every sparse export)."""

from __future__ import annotations

import copy

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import repeat_kv


def softmax_attention(q, k, v, allowed, scaling, key_bias=None):
    """Softmax attention over allowed keys; q [B, N, T, H], k/v [B, K, S, H], allowed bool
    broadcastable to [B, N, T, S]; key_bias None or float [B, K, S] added to the logits of every
    query of kv head k's group (DMA, NOSA). Rows with no allowed key (left padding) give 0, not NaN."""
    groups = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * scaling
    if key_bias is not None:
        scores = scores + key_bias.repeat_interleave(groups, 1)[:, :, None, :].to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, repeat_kv(v, groups)).transpose(1, 2)   # [B, T, N, H]


def key_score_bias(v, scale, proj):
    """DMA's / NOSA's learned key score A * softplus(v W_delta): v [B, K, S, H], scale A [K], proj
    W_delta [K * H, K] -> float32 [B, K, S] (the values of every kv head of a token, flattened)."""
    flat = v.float().transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)          # [B, S, K * H]
    return (scale.float() * torch.nn.functional.softplus(flat @ proj.float())).transpose(1, 2)


def gate_rope(config, dim: int):
    """(inverse frequencies [dim/2], cos/sin factor) of the model's RoPE scaling at width `dim` (a gate's
    or an indexer's): the JAX side applies the model's RopeConfig to that width, so YaRN's ramp and
    NTK's base use `dim`."""
    params = dict(getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 1e4)})
    ntk = getattr(config, "sparsetrain_ntk_rope", None)   # exported as a plain base for the model's head_dim
    if ntk:
        params["rope_theta"] = ntk["rope_theta"] * ntk["factor"] ** (dim / (dim - 2))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = float(params["rope_theta"])
        return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    gate_config = copy.copy(config)
    gate_config.head_dim, gate_config.rope_parameters = dim, params
    return ROPE_INIT_FUNCTIONS[rope_type](gate_config)


def rope(x, positions, inv_freq, factor: float):
    """Half-split rotary embedding of x [B, M, n, E] at positions [n] or [B, n], cos/sin multiplied by
    factor."""
    e = x.shape[-1]
    angles = positions.float()[..., None] * inv_freq.to(x.device)     # [n, E/2] or [B, n, E/2]
    if angles.ndim == 3:
        angles = angles[:, None]
    cos, sin = torch.cos(angles) * factor, torch.sin(angles) * factor
    x1, x2 = x[..., : e // 2], x[..., e // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def key_positions(positions, seq_kv):
    """[B or 1, S]: the keys end at the last query position (cached keys precede it)."""
    return positions[:, -1:] - (seq_kv - 1) + torch.arange(seq_kv, device=positions.device)


def with_padding(allowed, attention_mask, seq_kv):
    """Also respect transformers' 4-D mask (bool, or additive float with 0 = visible)."""
    if attention_mask is None:
        return allowed
    mask = attention_mask[..., :seq_kv]
    return allowed & (mask if mask.dtype == torch.bool else mask == 0)


def pool_blocks(x, block_size: int, kinds: tuple[str, ...] = ("avg",)):
    """[B, M, S, H] -> [B, M, nB, len(kinds) * H] float32, pooled ("avg", "max", "min") over the
    real tokens of each block of `block_size` (the last one possibly partial)."""
    b, m, s, h = x.shape
    n = -(-s // block_size)
    pad = n * block_size - s
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(b, m, n, block_size, h)
    real = (torch.arange(n * block_size, device=x.device) < s).view(1, 1, n, block_size, 1)
    count = torch.clamp(s - torch.arange(n, device=x.device) * block_size, max=block_size).view(1, 1, n, 1)
    pooled = {"avg": lambda: torch.where(real, x, 0.0).sum(3) / count,
              "max": lambda: torch.where(real, x, -torch.inf).amax(3),
              "min": lambda: torch.where(real, x, torch.inf).amin(3)}
    return torch.cat([pooled[kind]() for kind in kinds], dim=-1)


def lag_blocks(pooled):
    """[B, M, nB, F]: block i gets block i-1's value, block 0 zeros (a causal query pool)."""
    return torch.nn.functional.pad(pooled[:, :, :-1], (0, 0, 1, 0))


def ranked(key):
    """Per row, the column order of a stable descending sort (ties: lower index first, as lax.top_k)."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def forced_blocks(valid, force_first: int, force_local: int):
    """Per row, the first `force_first` and last `force_local` valid blocks."""
    from_start = torch.cumsum(valid.int(), -1)
    from_end = torch.flip(torch.cumsum(torch.flip(valid.int(), [-1]), -1), [-1])
    return valid & ((from_start <= force_first) | (from_end <= force_local))


def keep_top(values, count):
    """bool like values [..., S]: the `count` (an int or a tensor broadcastable to [..., 1]) best
    entries above -inf of each row, ties to the lower index (as lax.top_k)."""
    order = ranked(values)
    take = (torch.arange(values.shape[-1], device=values.device) < count) & (torch.gather(values, -1, order) > -torch.inf)
    return torch.zeros_like(take).scatter(-1, order, take)


def fill_blocks(chosen, scores, valid, budget: int):
    """bool [..., rows, nK]: the `chosen` blocks plus, per row, the valid others of highest score up
    to `budget` blocks in all (ties to the lower index, as sparsetrain's top-k). scores float
    broadcastable to chosen's shape; valid bool [rows, nK]."""
    rest = torch.where(valid & ~chosen, scores, -torch.inf)
    return chosen | keep_top(rest, budget - chosen.sum(-1, keepdim=True))


def block_max(x, k_pos, block_size: int):
    """[B, K, S] scores of keys at positions k_pos [B, S] (>= 0) -> float32 [B, K, nK], each key
    block's maximum (blocks of `block_size` positions, up to the last key's)."""
    n_k = int(k_pos.max()) // block_size + 1
    blocks = (k_pos // block_size)[:, None, :].expand(-1, x.shape[1], -1)
    empty = torch.full((*x.shape[:2], n_k), -torch.inf, device=x.device)
    return empty.scatter_reduce(2, blocks, x.float(), "amax")


class SequenceHistory:
    """Tensors of earlier tokens that a gate needs and the KV cache does not hold (e.g. queries),
    kept for the sequence being decoded. A forward whose first position is 0 starts a new sequence;
    positions must be contiguous from 0."""

    def __init__(self):
        self.tensors = None

    def update(self, positions, *tensors):
        """Append this forward's tensors ([B, M, T, H] each) on axis 2; all of the sequence so far."""
        if self.tensors is None or int(positions[0, 0]) == 0:
            self.tensors = tensors
        else:
            self.tensors = tuple(torch.cat([old, new], 2) for old, new in zip(self.tensors, tensors))
        return self.tensors

    def queries(self, positions, q, seq_kv: int, layer: str):
        """`update` with this forward's post-RoPE queries: those of the whole sequence so far,
        which must be as many as the cached keys."""
        (q_all,) = self.update(positions, q)
        if q_all.shape[2] != seq_kv:
            raise ValueError(f"{layer} layer: {q_all.shape[2]} remembered queries but {seq_kv} cached keys; "
                             f"start each sequence at position 0")
        return q_all


def token_mask(kept, q_pos, k_pos, q_block: int, k_block: int):
    """bool [B, M, T, S]: a block-level choice `kept` [B, M, nQ, nK] (query blocks of `q_block`
    tokens, key blocks of `k_block`) read at query positions q_pos [B, T] and key positions k_pos
    [B, S]. Positions must be >= 0."""
    heads = kept.shape[1]
    rows = kept.gather(2, (q_pos // q_block)[:, None, :, None].expand(-1, heads, -1, kept.shape[3]))
    return rows.gather(3, (k_pos // k_block)[:, None, None, :].expand(-1, heads, q_pos.shape[1], -1))


def attend_per_document(attend, q, k, v, *, q_raw, k_raw, hidden, attention_mask, positions, scaling):
    """`attend` (a method's forward) on each document of packed rows alone, or once for unpacked ones.

    Packed rows are given as transformers packs them: position ids [B or 1, T] that restart where a
    document starts (a position that does not continue the previous one by 1), use_cache=False and
    no attention_mask. transformers then masks its dense layers within documents; a sparse method
    here sees one document at a time (its blocks, gates and windows count from the document's
    start, as in training with segment ids). Call only without cached keys (k, v of T tokens)."""
    batch, seq = q.shape[0], q.shape[2]
    positions = positions.expand(batch, -1)
    restarts = torch.diff(positions, dim=-1) != 1                          # [B, T-1]
    if not bool(restarts.any()):
        return attend(q, k, v, q_raw=q_raw, k_raw=k_raw, hidden=hidden, attention_mask=attention_mask,
                      positions=positions, scaling=scaling)
    out = q.new_empty(batch, seq, q.shape[1], q.shape[3])                  # [B, T, N, H]
    for b in range(batch):
        bounds = [0, *(torch.nonzero(restarts[b]).flatten() + 1).tolist(), seq]
        for start, end in zip(bounds[:-1], bounds[1:]):
            doc = lambda x: x[b:b + 1, :, start:end]
            mask = None if attention_mask is None else attention_mask[b:b + 1, :, start:end, start:end]
            out[b:b + 1, start:end] = attend(doc(q), doc(k), doc(v), q_raw=doc(q_raw), k_raw=doc(k_raw),
                                             hidden=hidden[b:b + 1, start:end], attention_mask=mask,
                                             positions=positions[b:b + 1, start:end], scaling=scaling)
    return out
