"""Document masking of packed sequences: which (query, key) pairs, tiles and block poolings stay
inside one document.

segment_ids int [B, T]: the document of each token (the data pipeline's 1-based index within the
window; 0 = padding, which is one more document). Each id must form one contiguous run of its row,
as packing produces; the tile rules below rely on that. A query attends to a key iff both carry the
same id (and causality allows it).

Blocks are runs of `block_size` tokens from position 0 (the last one may be partial). A block that
straddles a boundary holds the end of one document and the start of the next ones: later query
blocks can share only its last document, earlier key blocks only its first one.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp


def same_document(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T, T]: query t and key s belong to the same document."""
    return segment_ids[:, :, None] == segment_ids[:, None, :]


def _block_ends(seq_len: int, block_size: int) -> tuple[jax.Array, jax.Array]:
    """(first token, last token) of each block, int [nB] each."""
    first = jnp.arange(0, seq_len, block_size)
    return first, jnp.minimum(first + block_size, seq_len) - 1


def document_block_mask(segment_ids: jax.Array, block_size: int, key_block_size: int | None = None) -> jax.Array:
    """bool [B, nQ, nK]: query block i (of `block_size` tokens) and key block j (of `key_block_size`,
    default the same) hold a (query, key) pair of the same document.

    Exact for contiguous documents: a key block that ends before query block i starts shares a
    document with it iff its last token's document is that of i's first token (the document then
    spans everything in between); a key block after i symmetrically; overlapping blocks share the
    tokens they both hold.
    """
    seq = segment_ids.shape[1]
    q_first, q_last = _block_ends(seq, block_size)
    k_first, k_last = _block_ends(seq, key_block_size or block_size)
    before = k_last[None, :] < q_first[:, None]                                    # [nQ, nK]
    after = k_first[None, :] > q_last[:, None]
    earlier = before & (segment_ids[:, k_last][:, None, :] == segment_ids[:, q_first][:, :, None])
    later = after & (segment_ids[:, k_first][:, None, :] == segment_ids[:, q_last][:, :, None])
    return earlier | later | ~(before | after)


def last_document_starts(positions: jax.Array, block_size: int) -> jax.Array:
    """int [B, nB]: the position each block's first token would have in the block's last document
    (its first token's own position unless the block straddles a boundary, since positions
    restart per document): where a key block's summary sits for RoPE."""
    first, last = _block_ends(positions.shape[1], block_size)
    return positions[:, last] - (last - first)


def block_document_tokens(segment_ids: jax.Array | None, block_size: int,
                          side: Literal["first", "last"]) -> jax.Array | None:
    """bool [B, T]: the tokens of the first or the last document of their block; None for None
    (all tokens count). Only a block's first document reads earlier blocks (a query block's routing
    summary pools over it), and only its last document is seen by later blocks (a key block's)."""
    if segment_ids is None:
        return None
    first, last = _block_ends(segment_ids.shape[1], block_size)
    ends = first if side == "first" else last
    block_doc = jnp.repeat(segment_ids[:, ends], block_size, axis=1)[:, :segment_ids.shape[1]]
    return segment_ids == block_doc


def document_tiles(segment_ids: jax.Array | None, block_size: int, key_block_size: int | None = None):
    """`document_block_mask` as bool [B, 1, nQ, nK] (broadcasting over heads), or True when
    documents are not masked: what selections intersect their candidate tiles with."""
    if segment_ids is None:
        return True
    return document_block_mask(segment_ids, block_size, key_block_size)[:, None]


def document_spans(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(offset of each token in its document, that document's length in the row), int32 [B, T] each."""
    seq = segment_ids.shape[1]
    index = jnp.arange(seq, dtype=jnp.int32)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.ones_like(change[:, :1]), change], axis=1)      # a run begins here
    ends = jnp.concatenate([change, jnp.ones_like(change[:, :1])], axis=1)        # a run ends here
    start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    end = jax.lax.cummin(jnp.where(ends, index, seq), axis=1, reverse=True)
    return index - start, end - start + 1


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """int32 [B, T]: the index in the row of the first token of each token's document."""
    offset, _ = document_spans(segment_ids)
    return jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - offset


def token_candidate_blocks(rows: jax.Array, n_blocks: int, block_size: int,
                           doc_start: jax.Array | None = None) -> jax.Array:
    """The key blocks a query token may select (NSA, InfLLM-V2): bool [C, nK] for the tokens at
    row indices `rows` [C], causal up to the token's own block; with doc_start [B, C] (the row index
    of each token's document's first token) only from the block holding it on, bool [B, 1, C, nK]
    (broadcasting over heads)."""
    block = jnp.arange(n_blocks)
    valid = block[None, :] <= (rows // block_size)[:, None]
    if doc_start is None:
        return valid
    return valid & (block >= (doc_start // block_size)[..., None])[:, None]
