"""Frozen, type-checked config dataclasses and dotted `key=value` overrides.

Every config class inherits `Config`: after construction each field is checked against its
annotation (int, float, bool, str, Literal[...] choices, tuples, nested configs), so a bad value fails
at parse time with the field's dotted path and what is allowed, never deep inside a jitted step.
Overrides are applied all together and the tree is validated once at the end, so their order never
matters, and every problem is reported at once, each naming its field.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from sparsetrain.errors import InputError


class ConfigError(InputError):
    """A config value or override that does not fit its field."""


# While overrides are being applied, nodes check their field types but defer cross-field checks
# (`validate`) to one pass over the finished tree.
_DEFER_VALIDATION = contextvars.ContextVar("defer_validation", default=False)


@contextlib.contextmanager
def _deferred_validation():
    token = _DEFER_VALIDATION.set(True)
    try:
        yield
    finally:
        _DEFER_VALIDATION.reset(token)


def type_name(tp: Any) -> str:
    """A readable form of a field annotation, for messages and --help."""
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        args = get_args(tp)
        return f"tuple[{type_name(args[0])}, ...]" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, path: str) -> None:
    """Raise ConfigError unless `value` is an instance of the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}={value!r} is not allowed; choose one of {type_name(tp)}")
        return
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                _check(value, option, path)
                return
            except ConfigError:
                pass
        raise ConfigError(f"{path}={value!r} must be {type_name(tp)}")
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
        raise ConfigError(f"{path}={value!r} must be {type_name(tp)}, got {type(value).__name__}")


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
        if not _DEFER_VALIDATION.get():
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
        raise ConfigError(f"{path}={text!r} must be {type_name(tp)}")
    if origin is Literal:
        for choice in get_args(tp):
            if str(choice) == text:
                return choice
        raise ConfigError(f"{path}={text!r} is not allowed; choose one of {type_name(tp)}")
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
    raise ConfigError(f"{path} cannot be set from the command line (type {type_name(tp)})")


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
    elif dataclasses.is_dataclass(current):
        raise ConfigError(f"{here} is a group; set one of its fields, e.g. {here}.<field>=...")
    elif get_origin(tp) is tuple and dataclasses.is_dataclass(get_args(tp)[0]):
        new = _parse_config_list(text, get_args(tp)[0], here)
    else:
        new = _parse_scalar(text, tp, here)
    try:
        return node.with_field(key, new)
    except ConfigError as e:
        raise ConfigError(f"{here}: {e}") from None


def _parse_config_list(text: str, item_cls: type, path: str) -> tuple:
    """A tuple of configs from an inline YAML/JSON list of mappings, e.g. for attention rules
    `[{layers: all, method: dense}, {layers: "1:-1", method: seer, topk: 4}]`."""
    import yaml   # only overrides of whole rule lists need it

    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not a YAML/JSON list ({str(e).splitlines()[0]})") from None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ConfigError(f"{path}: give a list of mappings, e.g. '[{{layers: all, method: dense}}]'")
    return tuple(from_dict(item_cls, item, strict=True, path=f"{path}.{i}") for i, item in enumerate(items))


def validation_errors(node: Any, path: str = "") -> list[str]:
    """Every cross-field problem of a config tree, one message per node that fails, each prefixed
    with the node's dotted path (children first, then the node itself)."""
    errors: list[str] = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        children = value if isinstance(value, tuple) else (value,)
        for i, child in enumerate(children):
            if isinstance(child, Config):
                where = f"{path}{f.name}." + (f"{i}." if isinstance(value, tuple) else "")
                errors += validation_errors(child, where)
    try:
        node.validate()
    except ConfigError as e:
        errors.append(f"{path}{e}")
    return errors


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b.c=value` strings; tuples of configs are indexed (`model.attention.1.method=x`) or
    replaced whole by an inline list. Values are type-checked as they are parsed; the finished tree
    is validated once, so the order of overrides does not matter. Raises one ConfigError listing
    every problem, one per line."""
    errors = []
    with _deferred_validation():
        for item in overrides:
            if "=" not in item:
                errors.append(f"override {item!r} must look like key.sub=value")
                continue
            key, text = item.split("=", 1)
            try:
                cfg = _replace_path(cfg, key.strip().split("."), text.strip(), "")
            except ConfigError as e:
                errors.append(str(e))
    errors += validation_errors(cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def reject_repeated_keys(overrides: list[str]) -> None:
    """Raise ConfigError if a key is given twice: on a command line the second would silently win."""
    seen: dict[str, str] = {}
    repeated = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in seen:
            repeated.append(f"{key} is given twice ({seen[key]!r} and {item!r}); give each key once")
        seen[key] = item
    if repeated:
        raise ConfigError("\n".join(repeated))


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form, for JSON and checkpoint metadata."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(x) for x in cfg]
    return cfg


def from_dict(cls: type, data: dict, *, strict: bool = False, path: str = "") -> Any:
    """Inverse of `to_dict` for a config class. Checkpoint metadata (strict=False): keys the class
    no longer has are dropped, so configs saved by older versions still load. User input
    (strict=True): an unknown key is an error naming the fields the class has."""
    cls = cls.class_for(data)
    data = data if strict else cls.migrate(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if strict and unknown:
        what = f" (method {data['method']!r})" if "method" in data else ""
        raise ConfigError(f"{path}: unknown key(s) {unknown}; {cls.__name__}{what} has: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        here = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value, strict=strict, path=here)
        elif get_origin(tp) is tuple:
            item_tp = get_args(tp)[0] if get_args(tp) else Any
            value = tuple(from_dict(item_tp, v, strict=strict, path=f"{here}.{i}")
                          if dataclasses.is_dataclass(item_tp) else v for i, v in enumerate(value))
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
