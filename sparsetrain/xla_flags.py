"""XLA compiler flags for GPU training, shared by train.py and the benchmarks so both measure the
same compiled program."""

from __future__ import annotations

import os

# From MaxText's H100 recipe; measured 4% faster on the 125M config (docs/benchmarks.md).
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false "
                 "--xla_gpu_enable_command_buffer=")


def use_gpu_xla_flags() -> None:
    """Put GPU_XLA_FLAGS in XLA_FLAGS. Call before JAX starts its backend; flags the user already put
    in XLA_FLAGS come later and win."""
    os.environ["XLA_FLAGS"] = f"{GPU_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()
