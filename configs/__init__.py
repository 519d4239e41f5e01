"""Named run configs: each module defines `get_config() -> RunConfig`."""

import importlib
import pkgutil
from pathlib import Path

from sparsetrain.config import RunConfig


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]))


def load(name_or_path: str) -> RunConfig:
    """Load `configs/NAME.py` by name ("tiny") or path ("configs/tiny.py")."""
    name = Path(name_or_path).stem
    if name not in available():
        raise ValueError(f"unknown config {name_or_path!r}; available: {', '.join(available())}")
    return importlib.import_module(f"configs.{name}").get_config()
