"""Launch helpers shared by the Pallas Triton kernels: tuning, the poison hook, dot precision.

Trace-time overrides (tests and benchmarks) are read while the kernels are traced, so a caller
must trace inside the context (a fresh jax.jit, or eager calls).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Triton launch parameters: forward (also used by the scores kernels) and backward."""

    fwd_warps: int = 4
    fwd_stages: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 2
    token_rows: int = 16  # token-level kernel: at least this many rows (heads x tokens) a tile
    # Token-level loop order: "query" (token_kernel: tiles of consecutive tokens), "key"
    # (token_gather_kernel: a key block gathers the rows that selected it), or "auto".
    token_order: str = "auto"
    gather_rows: int = 64    # key-block-outer: rows a chunk (the MMA M-dimension)
    gather_chunks: int = 4   # key-block-outer: chunks a program, sharing one K/V block load


def default_tuning(block: int, head_dim: int) -> Tuning:
    # H100 sweep (docs/benchmarks.md): up to 64x128 tiles, 4 warps / 2 stages beats 8 warps by
    # 1.4x (fwd) and 1.8x (fwd+bwd), and 3 stages slows the backward; 128x128 tiles want 8 warps,
    # and with 3 stages their backward exceeds the shared memory.
    big = block * head_dim > 64 * 128
    return Tuning(fwd_warps=8 if big else 4, bwd_warps=8 if big else 4)


@dataclasses.dataclass(frozen=True)
class _Overrides:
    poison: float | None = None
    tuning: Tuning | None = None


_OVERRIDES = contextvars.ContextVar("block_sparse_overrides", default=_Overrides())


@contextlib.contextmanager
def poison_outputs(value: float = float("nan")):
    """Kernel outputs traced inside start filled with `value`, so a tile the kernel forgets to
    write shows up in a test (compiled kernels otherwise start from whatever memory held)."""
    token = _OVERRIDES.set(dataclasses.replace(_OVERRIDES.get(), poison=value))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@contextlib.contextmanager
def tuning(params: Tuning):
    """Overrides the launch parameters of kernels traced inside (for benchmark sweeps)."""
    token = _OVERRIDES.set(dataclasses.replace(_OVERRIDES.get(), tuning=params))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def current_tuning(block: int, head_dim: int) -> Tuning:
    return _OVERRIDES.get().tuning or default_tuning(block, head_dim)


def pallas(kernel, *, grid, in_specs, out_specs, out_shape, warps, stages, interpret, name):
    """pl.pallas_call with the poison hook: poisoned outputs alias NaN-filled inputs."""
    poison = _OVERRIDES.get().poison
    params = pltr.CompilerParams(num_warps=warps, num_stages=stages)
    if poison is None:
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, compiler_params=params, interpret=interpret, name=name)
    single = not isinstance(out_shape, (list, tuple))
    out_shape, out_specs = ([out_shape], [out_specs]) if single else (out_shape, out_specs)
    n_in, n_out = len(in_specs), len(out_shape)

    def kernel_skipping_aliases(*refs):  # the aliased inputs are never read
        kernel(*refs[:n_in], *refs[n_in + n_out:])

    call = pl.pallas_call(
        kernel_skipping_aliases, grid=grid, in_specs=[*in_specs, *out_specs], out_specs=out_specs,
        out_shape=out_shape, compiler_params=params, interpret=interpret, name=name,
        input_output_aliases={n_in + i: i for i in range(n_out)})

    def run(*args):
        outs = call(*args, *(jnp.full(o.shape, poison, o.dtype) for o in out_shape))
        return outs[0] if single else outs
    return run



def dot_precision(dtype):
    # f32 inputs: IEEE products (Triton's default for f32 is TF32); 16-bit inputs: tensor cores.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
