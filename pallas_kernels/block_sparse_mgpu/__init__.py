"""Block-sparse flash attention forward on Mosaic GPU (Hopper), with the Triton backward.

kernel.block_sparse_attention shares the signature of pallas_kernels.block_sparse.reference's.
"""

from pallas_kernels.block_sparse_mgpu.kernel import MgpuTuning, block_sparse_attention, tuning

__all__ = ["MgpuTuning", "block_sparse_attention", "tuning"]
