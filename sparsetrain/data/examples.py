"""One training example from a window of token ids: the fields every source's windows share.

Layout (L = seq_len; the module docstring of `sparsetrain.data.pipeline` says what each means):
inputs, targets int32 [L]; loss_mask float32 [L]; segment_ids int32 [L] (documents masked only);
positions int32 [L].
"""

from __future__ import annotations

import numpy as np

Batch = dict[str, np.ndarray]


def window_example(window: np.ndarray, doc: np.ndarray, *, cross_document_attention: bool) -> Batch:
    """One example (layout in the module docstring) from a window of L + 1 token ids whose first
    len(doc) tokens are real, `doc` [n] numbering their documents in non-decreasing order (each
    document's eos belongs to it); the rest is padding."""
    seq_len = len(window) - 1
    segment_ids = np.zeros(len(window), dtype=np.int32)
    segment_ids[:len(doc)] = doc - doc[:1] + 1
    # Train on target t+1 only if it is real and in the same document as input t. Across a
    # boundary the input is the previous document's eos and the target the next document's first
    # token, which nothing in the window lets the model predict (documents are unrelated), so
    # that prediction is masked. Predicting eos itself, at the end of a document, is trained.
    loss_mask = np.zeros(seq_len, dtype=np.float32)
    loss_mask[:max(len(doc) - 1, 0)] = doc[1:] == doc[:-1]
    example = {"inputs": window[:-1], "targets": window[1:], "loss_mask": loss_mask}
    if cross_document_attention:
        return {**example, "positions": np.arange(seq_len, dtype=np.int32)}
    return {**example, "segment_ids": segment_ids[:-1], "positions": document_positions(segment_ids[:-1])}


def document_positions(segment_ids: np.ndarray) -> np.ndarray:
    """int32 [L]: each token's offset from the first token of its run of equal segment ids."""
    index = np.arange(len(segment_ids))
    starts = np.flatnonzero(np.diff(segment_ids, prepend=-1))      # first token of every run
    return (index - starts[np.searchsorted(starts, index, side="right") - 1]).astype(np.int32)
