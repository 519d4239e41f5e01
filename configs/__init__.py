"""Named run configs: each module defines `get_config() -> RunConfig`."""

import importlib
import importlib.util
import json
import pkgutil
from pathlib import Path

from sparsetrain.config import RunConfig
from sparsetrain.configbase import ConfigError, from_dict


def available() -> list[str]:
    # Modules named _x hold what several configs share (e.g. _workflows.py); they are no config.
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def load(name_or_path: str) -> RunConfig:
    """A config by name ("tiny"), by the path of any Python config file defining `get_config()`
    ("experiments/mine.py"), or from a run's saved config.json ("runs/x/config.json"), which
    reproduces that run's config exactly."""
    path = Path(name_or_path)
    # configs/NAME.py names a config from any directory; other paths must exist.
    if not path.is_file() and (path.suffix == ".json" or (path.suffix == ".py" and path.stem not in available())):
        raise ConfigError(f"--config {name_or_path}: no such file")
    if path.suffix == ".json":
        try:
            return from_dict(RunConfig, json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {name_or_path}: not valid JSON ({e.msg})") from None
    if path.suffix == ".py" and path.is_file() and path.resolve().parent != Path(__file__).parent:
        spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"--config {name_or_path}: the file defines no get_config()")
        return module.get_config()
    if path.stem not in available():
        raise ConfigError(f"unknown config {name_or_path!r}: give a name ({', '.join(available())}), "
                          f"the path of a Python config file, or a run's config.json")
    return importlib.import_module(f"configs.{path.stem}").get_config()
