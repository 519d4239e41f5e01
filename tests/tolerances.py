"""Tolerances relative to a tensor's scale: float32 summation order varies by CPU and by program,
so a fixed absolute tolerance below float32 noise fails on some machines."""

import numpy as np


def assert_close_to_scale(actual, desired, rel: float = 1e-5, err_msg: str = "") -> None:
    """|actual - desired| <= rel * (|desired| + max |desired|), elementwise."""
    desired = np.asarray(desired, np.float64)
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rel,
                               atol=rel * float(np.abs(desired).max()), err_msg=err_msg)
