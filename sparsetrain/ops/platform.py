"""The one place that picks an implementation by platform: dense attention and the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DENSE_IMPLS = ("auto", "xla", "cudnn")
KERNEL_IMPLS = ("auto", "pallas", "pallas_tpu", "mosaic_gpu", "xla")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def dense_impl(impl: str, dtype) -> str:
    """'auto' picks cuDNN on a GPU for half-precision inputs (cuDNN rejects float32), else XLA."""
    if impl not in DENSE_IMPLS:
        raise ValueError(f"impl={impl!r}; choose one of {DENSE_IMPLS}")
    if impl != "auto":
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu() and half else "xla"


def kernel_backend(impl: str, interpret: bool | None) -> tuple[str, bool]:
    """(backend, interpret?) for a block-sparse op's `impl` / `interpret` pair; backend is
    "reference" (pure jnp), "triton" (Pallas Triton, GPU), "tpu" (Pallas Mosaic TPU) or
    "mosaic_gpu" (Pallas Mosaic GPU forward and backward; Hopper only).

    "auto": the compiled kernel of the platform (GPU: Triton, TPU: Mosaic); elsewhere the reference,
    unless interpret=True asks for the Triton kernel's interpreter. "pallas": the platform's kernel
    (Triton off TPU), interpreted when interpret=True or (None and no GPU/TPU). "pallas_tpu": the
    TPU kernel, in the TPU interpreter off a TPU. "mosaic_gpu": opt-in, compiled on a GPU, or in
    Mosaic GPU's interpreter with interpret=True (any platform). "xla": the reference.
    """
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"impl={impl!r}; choose one of {KERNEL_IMPLS}")
    platform = jax.default_backend()
    if impl == "mosaic_gpu":
        if platform != "gpu" and not interpret:
            raise ValueError(f"impl='mosaic_gpu' runs compiled on a Hopper GPU only (platform "
                             f"{platform!r}); pass interpret=True for its interpreter (CPU, small "
                             f"shapes), or choose another of {KERNEL_IMPLS}")
        return "mosaic_gpu", bool(interpret)
    if impl == "xla" or (impl == "auto" and platform not in ("gpu", "tpu") and not interpret):
        return "reference", False
    backend = "tpu" if impl == "pallas_tpu" or platform == "tpu" else "triton"
    native = platform == ("tpu" if backend == "tpu" else "gpu")
    interpret = (not native) if interpret is None else bool(interpret)
    if not interpret and not native:
        raise ValueError(f"compiled Pallas {'Mosaic TPU' if backend == 'tpu' else 'Triton'} kernels need "
                         f"a {'TPU' if backend == 'tpu' else 'GPU'}; pass interpret=True or impl='xla'")
    return backend, interpret
