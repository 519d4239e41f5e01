"""Shared test helpers for tests/ops: fresh seeds, random inputs, baseline-relative tolerances."""

from __future__ import annotations

import os
import zlib

import jax
import numpy as np
import pytest

ON_GPU = jax.default_backend() == "gpu"
# Compiled-kernel variants: marked `gpu` and skipped elsewhere.
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]

# Fresh inputs on every run; set SPARSETRAIN_TEST_SEED to replay a failure (the seed is printed).
RUN_SEED = int(os.environ.get("SPARSETRAIN_TEST_SEED", np.random.SeedSequence().entropy % 2**31))

# Error allowed on top of the baseline's, as a fraction of the largest true magnitude: a few ulps
# of the output dtype (bf16 outputs are rounded to 8 bits of mantissa).
FLOOR = {"float32": 2e-5, "bfloat16": 8e-3, "float16": 2e-3}


def seeded_rng(request) -> np.random.Generator:
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ RUN_SEED) % 2**32
    print(f"seed={seed} (SPARSETRAIN_TEST_SEED={RUN_SEED})")
    return np.random.default_rng(seed)


def assert_close(name: str, got, naive, truth, dtype: str) -> None:
    """FlashAttention's rule: |got - truth| <= 2 |naive - truth| + floor, where `naive` is a plain
    implementation in the same precision as `got` and `truth` a float32/float64 one."""
    got, naive, truth = (np.asarray(x, np.float64) for x in (got, naive, truth))
    assert got.shape == truth.shape, f"{name}: shape {got.shape} != {truth.shape}"
    assert np.isfinite(got).all(), f"{name}: {np.isnan(got).sum()} NaN/inf values (unwritten tile?)"
    err = np.abs(got - truth).max()
    base = np.abs(naive - truth).max()
    bound = 2 * base + FLOOR[dtype] * max(np.abs(truth).max(), 1e-3)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (naive {dtype} error {base:.3g})"
