"""Typed configuration from plain dicts (TOML), with errors that name the exact key path.

Every config in memc (toolchain.toml sections, each pass's options) is a dataclass; ``from_dict`` validates a
mapping against it so that ``pipeline[1].threshold: expected float, got 'high'`` is what a user sees, not a
TypeError from deep inside a pass.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from memc.errors import ConfigError

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its documentation (shown by ``memc passes`` and in errors)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{type_name(get_args(tp)[0])}]"
    if origin is dict:
        return f"table of {type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (nested dataclasses are built)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: expected {type_name(tp)}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {type_name(tp)}, got {_describe(value)}")
        (item,) = get_args(tp)
        return [coerce(v, item, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {type_name(tp)}, got {_describe(value)}")
        _, item = get_args(tp)
        return {str(k): coerce(v, item, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool (true/false), got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected string, got {_describe(value)}")
        return value
    raise TypeError(f"memc.schema cannot validate annotation {tp!r} at {path}")  # a bug in memc, not user input


def unknown_key_error(path: str, key: str, valid: typing.Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    where = _join(path, key)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}: unknown key. {hint}Valid keys here: {', '.join(valid) or '(none)'}")


def from_dict(cls: type[T], data: Any, path: str = "", *, ignore: typing.Collection[str] = ()) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types with their key path."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields and key not in ignore:
            raise unknown_key_error(path, key, fields)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing ({type_name(hints[name])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{path or 'config'}: {exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A JSON/TOML-friendly view of a config dataclass (for reports and --dry-run)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, doc) for each option: what ``memc passes`` prints."""
    hints = get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f.name, type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows
