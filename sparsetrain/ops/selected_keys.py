"""Public op: attention over individually selected keys, one list per query token shared by all
its heads (DSA), dispatched between the Pallas Triton kernel and its jnp reference.

Arrays in, arrays out. `map_query_chunks` and `gather_rows` (the reference's chunk loop and row
gather) are re-exported for the methods' own chunked passes.
"""

from __future__ import annotations

from pallas_kernels.selected_keys import kernel as _kernel
from pallas_kernels.selected_keys import reference as _reference
from pallas_kernels.selected_keys.reference import gather_rows, map_query_chunks
from sparsetrain.ops.platform import on_gpu

__all__ = ["gather_rows", "map_query_chunks", "selected_key_attention"]


def selected_key_attention(q, k, v, indices, *, sm_scale=None, query_chunk=256, return_lse=False, impl="auto",
                           interpret=None):
    """Softmax attention of each query token over its own list of keys (entries < 0 are padding),
    shared by all its heads: `pallas_kernels/selected_keys/reference.py` documents the arguments.

    impl: "xla" (the reference; also "auto", until the kernel is timed on a GPU) or "pallas" (the
    Triton kernel; in interpret mode off a GPU unless `interpret` says otherwise).
    """
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"impl={impl!r}; choose 'auto', 'xla' or 'pallas'")
    if impl == "pallas":
        return _kernel.selected_key_attention(q, k, v, indices, sm_scale=sm_scale, query_chunk=query_chunk,
                                              return_lse=return_lse,
                                              interpret=not on_gpu() if interpret is None else interpret)
    return _reference.selected_key_attention(q, k, v, indices, sm_scale=sm_scale, query_chunk=query_chunk,
                                             return_lse=return_lse)
