"""The one place that picks an implementation by platform: dense attention and the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DENSE_IMPLS = ("auto", "xla", "cudnn")
KERNEL_IMPLS = ("auto", "pallas", "xla")


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


def kernel_impl(impl: str, interpret: bool | None) -> tuple[bool, bool]:
    """(use the Pallas kernel?, interpret it?) for a block-sparse op's `impl` / `interpret` pair.

    "auto": compiled Pallas on GPU; elsewhere the pure-jnp reference, unless interpret=True asks for
    the Pallas interpreter. "pallas": the kernel, interpreted when interpret=True or (None and no
    GPU). "xla": the reference.
    """
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"impl={impl!r}; choose one of {KERNEL_IMPLS}")
    gpu = on_gpu()
    if impl == "xla":
        return False, False
    if impl == "auto" and not gpu and not interpret:
        return False, False
    interpret = (not gpu) if interpret is None else bool(interpret)
    if not interpret and not gpu:
        raise ValueError("compiled Pallas Triton kernels need a GPU; pass interpret=True or impl='xla'")
    return True, interpret
