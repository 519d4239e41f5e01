"""Block-sparse flash attention and block ground truth on Pallas Mosaic TPU.

kernel.block_sparse_attention and scores.block_attention_scores have the signatures and semantics
of `pallas_kernels.block_sparse.reference`; TPU tiles restrict block_size to 128, 256 or 512 and
head_dim is zero-padded to a multiple of 128. `interpret=True` runs the TPU interpreter on CPU.
"""

from pallas_kernels.block_sparse_tpu.kernel import BLOCK_SIZES, block_sparse_attention
from pallas_kernels.block_sparse_tpu.scores import block_attention_scores

__all__ = ["BLOCK_SIZES", "block_attention_scores", "block_sparse_attention"]
