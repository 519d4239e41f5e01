"""Block-sparse flash attention and SeerAttention's block ground truth: Pallas kernels + references.

kernel.block_sparse_attention / reference.block_sparse_attention,
scores.block_attention_scores / reference.block_attention_scores and
kernel.attention_with_block_scores / reference.attention_with_block_scores share their signatures.
"""

from pallas_kernels.block_sparse import reference
from pallas_kernels.block_sparse.common import SegmentIds, mask_to_indices
from pallas_kernels.block_sparse.kernel import (Tuning, attention_with_block_scores, block_sparse_attention,
                                                poison_outputs, tuning)
from pallas_kernels.block_sparse.scores import block_attention_scores

__all__ = ["SegmentIds", "Tuning", "attention_with_block_scores", "block_attention_scores", "block_sparse_attention",
           "mask_to_indices", "poison_outputs", "reference", "tuning"]
