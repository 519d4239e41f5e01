"""InfLLM-V2's (and NSA's, pool="overlap") per-token block scores from compressed keys: one dispatch between the fused Pallas
kernel (GPU) and its pure-jnp reference (elsewhere, and `impl="xla"`). The TPU has no Mosaic
version yet, so it runs the reference."""

from __future__ import annotations

import jax

from pallas_kernels.compressed_scores import kernel as _kernel
from pallas_kernels.compressed_scores import reference as _reference
from sparsetrain.ops.platform import kernel_backend

# "mosaic_gpu" replaces only the attention forward; these scores stay on Triton.
_BACKENDS = {"reference": _reference.token_block_scores, "triton": _kernel.token_block_scores,
             "tpu": _reference.token_block_scores, "mosaic_gpu": _kernel.token_block_scores}


def token_block_scores(q, fine, coarse, *, block_size, kernel_size, kernel_stride, coarse_size,
                       coarse_stride, doc_start=None, sm_scale=None, query_chunk=512, pool="max",
                       impl="auto", interpret=None):
    """f32 [B, K, T, nK]: see `pallas_kernels.compressed_scores.kernel.token_block_scores`.
    impl/interpret as for `sparsetrain.ops.block_sparse_attention`. No gradient (a selection)."""
    backend, interpret = kernel_backend(impl, interpret)
    q, fine, coarse = jax.lax.stop_gradient((q, fine, coarse))
    return _BACKENDS[backend](q, fine, coarse, block_size=block_size, kernel_size=kernel_size,
                              kernel_stride=kernel_stride, coarse_size=coarse_size, coarse_stride=coarse_stride,
                              doc_start=doc_start, sm_scale=sm_scale, query_chunk=query_chunk, pool=pool,
                              interpret=interpret)
