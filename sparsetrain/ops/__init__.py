"""Public kernel API: block-sparse attention, attention over selected keys (DSA), SeerAttention's block
ground truth, and block selection.

Arrays in, arrays out; no config or model knowledge. The kernels live in `pallas_kernels/`.
"""

from pallas_kernels.block_sparse.common import SegmentIds
from sparsetrain.ops.block_sparse import (attention_with_block_scores, block_attention_scores,
                                          block_sparse_attention)
from sparsetrain.ops.selection import (Selection, budget_block_mask, causal_block_mask, forced_block_mask,
                                       indices_to_mask, mask_to_indices, selection_density,
                                       selection_recall, threshold_block_mask, tile_weights,
                                       topk_block_lists, topk_block_mask, topp_block_mask,
                                       transposed_indices, window_block_mask)
from sparsetrain.ops.selected_keys import selected_key_attention

__all__ = [
    "SegmentIds", "Selection", "attention_with_block_scores", "block_attention_scores",
    "block_sparse_attention", "budget_block_mask", "causal_block_mask", "forced_block_mask", "indices_to_mask", "mask_to_indices",
    "selected_key_attention", "selection_density", "selection_recall", "threshold_block_mask", "tile_weights",
    "topk_block_lists", "topk_block_mask", "topp_block_mask", "transposed_indices", "window_block_mask",
]
