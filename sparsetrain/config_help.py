"""`train.py --help`: every field of a config, grouped by section, with its one-line meaning.

The meaning of a field is the comment written beside it (or on the line above it) in its config
class, read from the source, so the help never drifts from the code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing

from sparsetrain.configbase import type_name

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=.*?)?(?:#\s*(?P<inline>.*))?$")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: first line of its comment} for a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            match = _FIELD.match(line)
            if match and match.group(1) in {f.name for f in dataclasses.fields(klass)}:
                text = match.group("inline") or (above[0] if above else "")
                if text:
                    docs[match.group(1)] = text.strip()
            above = []
    return docs


def _line(cfg, name: str, path: str) -> str:
    meaning = field_docs(type(cfg)).get(name)
    tp = type_name(typing.get_type_hints(type(cfg))[name])
    return f"  {path} = {getattr(cfg, name)!r}  [{tp}]" + (f"  # {meaning}" if meaning else "")


def _leaves(cfg, prefix: str) -> list[str]:
    lines = []
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines += _leaves(value, path + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                lines += _leaves(item, f"{path}.{i}.")
        else:
            lines.append(_line(cfg, f.name, path))
    return lines


def describe(cfg) -> list[str]:
    """Help lines: the run's own fields, then one section per group with its leaf fields."""
    run, sections = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sections += ["", f"{f.name}:", *_leaves(value, f"{f.name}.")]
        else:
            run.append(_line(cfg, f.name, f.name))
    return ["run:", *run, *sections]
