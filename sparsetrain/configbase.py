"""Frozen, type-checked config dataclasses and dotted `key=value` overrides.

Every config class inherits `Config`: after construction each field is checked against its
annotation (int, float, bool, str, Literal[...] choices, tuples, nested configs), so a bad value fails
at parse time with the field's dotted path and what is allowed, never deep inside a jitted step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A config value or override that does not fit its field."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        args = get_args(tp)
        return f"tuple[{_type_name(args[0])}, ...]" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, path: str) -> None:
    """Raise ConfigError unless `value` is an instance of the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}={value!r} is not allowed; choose one of {_type_name(tp)}")
        return
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                _check(value, option, path)
                return
            except ConfigError:
                pass
        raise ConfigError(f"{path}={value!r} must be {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{path}={value!r} must be a tuple")
        item_tp = get_args(tp)[0] if get_args(tp) else Any
        for i, item in enumerate(value):
            _check(item, item_tp, f"{path}.{i}")
        return
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}={value!r} must be None")
        return
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return  # 1 is a fine learning rate; the field is converted in __post_init__
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{path}={value!r} must be {tp.__name__}, not bool")
    if not isinstance(value, tp):
        raise ConfigError(f"{path}={value!r} must be {_type_name(tp)}, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every config node: type-checks fields; subclasses add cross-field checks in `validate`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(value, hints[f.name], f.name)
            if hints[f.name] is float and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ConfigError naming the field."""

    def with_field(self, name: str, value: Any) -> "Config":
        """A copy with one field changed (overrides go through here, so a node may redefine what
        setting a field means, as attention rules do for `method`)."""
        return dataclasses.replace(self, **{name: value})

    @classmethod
    def class_for(cls, data: dict) -> type:
        """The class to rebuild `data` (a `to_dict` result) with: `cls`, or a subclass it names."""
        return cls

    @classmethod
    def migrate(cls, data: dict) -> dict:
        """Adapt `data` written by an older version of this class (default: unchanged)."""
        return data

    def require(self, ok: bool, field: str, message: str) -> None:
        if not ok:
            value = getattr(self, field)
            shown = field if isinstance(value, Config) else f"{field}={value!r}"
            raise ConfigError(f"{shown}: {message}")


def _parse_scalar(text: str, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in get_args(tp):
            return None
        for option in get_args(tp):
            if option is type(None):
                continue
            try:
                return _parse_scalar(text, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}={text!r} must be {_type_name(tp)}")
    if origin is Literal:
        for choice in get_args(tp):
            if str(choice) == text:
                return choice
        raise ConfigError(f"{path}={text!r} is not allowed; choose one of {_type_name(tp)}")
    if origin is tuple:
        item_tp = get_args(tp)[0] if get_args(tp) else str
        items = [t.strip() for t in text.split(",") if t.strip()]
        return tuple(_parse_scalar(t, item_tp, f"{path}.{i}") for i, t in enumerate(items))
    if tp is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{path}={text!r} must be a bool (true/false)")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{path}={text!r} must be {tp.__name__}") from None
    if tp is str or tp is Any:
        return text
    raise ConfigError(f"{path} cannot be set from the command line (type {_type_name(tp)})")


def _replace_path(node: Any, keys: list[str], text: str, path: str) -> Any:
    key, rest = keys[0], keys[1:]
    here = f"{path}.{key}" if path else key
    if isinstance(node, tuple):
        if not key.isdigit() or int(key) >= len(node):
            raise ConfigError(f"{here}: index must be in 0..{len(node) - 1}")
        if not rest:
            raise ConfigError(f"{path}: set the whole tuple as a comma-separated list, not item {key}")
        items = list(node)
        items[int(key)] = _replace_path(node[int(key)], rest, text, here)
        return tuple(items)
    if not dataclasses.is_dataclass(node):
        raise ConfigError(f"{here}: {path} has no sub-fields")
    names = [f.name for f in dataclasses.fields(node)]
    if key not in names:
        what = f"{path} (method {node.method!r})" if hasattr(node, "method") else (path or "config")
        raise ConfigError(f"unknown key {here!r}; {what} has: {', '.join(names)}")
    tp = typing.get_type_hints(type(node))[key]
    current = getattr(node, key)
    if rest:
        new = _replace_path(current, rest, text, here)
    elif dataclasses.is_dataclass(current) or (isinstance(current, tuple) and current
                                                and dataclasses.is_dataclass(current[0])):
        raise ConfigError(f"{here} is a group; set one of its fields, e.g. {here}.<field>=...")
    else:
        new = _parse_scalar(text, tp, here)
    try:
        return node.with_field(key, new)
    except ConfigError as e:
        raise ConfigError(f"{here}: {e}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b.c=value` strings in order; tuples of configs are indexed (`model.attention.1.method=x`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        cfg = _replace_path(cfg, key.strip().split("."), text.strip(), "")
    return cfg


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """One line per leaf field: dotted path, type and current value (for --help)."""
    lines = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines += describe(value, path + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                lines += describe(item, f"{path}.{i}.")
        else:
            lines.append(f"  {path} = {value!r}  [{_type_name(hints[f.name])}]")
    return lines


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form, for JSON and checkpoint metadata."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(x) for x in cfg]
    return cfg


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of `to_dict` for a config class (checkpoint metadata back to a Config). Keys the class
    no longer has are dropped, so configs saved by older versions still load."""
    cls = cls.class_for(data)
    data = cls.migrate(data)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value)
        elif get_origin(tp) is tuple:
            item_tp = get_args(tp)[0] if get_args(tp) else Any
            value = tuple(from_dict(item_tp, v) if dataclasses.is_dataclass(item_tp) else v
                          for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)
