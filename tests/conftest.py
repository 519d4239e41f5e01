import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU (run through the device machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
