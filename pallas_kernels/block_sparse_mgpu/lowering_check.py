"""Lower a Mosaic GPU function for Hopper (sm_90a) on a machine without a GPU.

This runs the Python half of Mosaic GPU: Pallas -> Mosaic GPU MLIR, layout inference and the
dialect lowering, which is where most kernel-construction errors (shapes, layouts, transforms,
wgmma operands) surface. PTX generation, ptxas and the run itself still need a GPU.

It works by pretending the architecture: Mosaic GPU asks the CUDA runtime for it through a
private hook (`mosaic.gpu.utils._infer_arch`), absent on CPU. If a JAX upgrade removes that hook,
`lower_for_hopper` raises AttributeError and the CPU lowering tests skip.
"""

from __future__ import annotations

import contextlib

import jax
from jax.experimental.mosaic.gpu import utils as mgpu_utils


@contextlib.contextmanager
def pretend_hopper():
    original = mgpu_utils._infer_arch
    mgpu_utils._infer_arch = lambda: (9, 0)
    try:
        yield
    finally:
        mgpu_utils._infer_arch = original


def lower_for_hopper(fn, *args) -> str:
    """StableHLO text of jit(fn)(*args) lowered for CUDA (args: arrays or ShapeDtypeStructs)."""
    with pretend_hopper():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
