"""Config overrides: ``--set target.opset=21`` on the command line, ``overrides={"target.opset": 21}`` in Python.

A key is a dotted path through the toolchain schema, list entries by index (``pipeline.1.window``,
``target.verify_shapes.0`` or ``pipeline[1].window``); a pipeline entry's keys are its pass's options. Values are
typed by the schema: from the command line, a key whose type admits a string takes the text as is, any other is
read as a TOML value (``21``, ``true``, ``1e-4``, ``[[1, 7], [2, 9]]``, ``{0 = "batch"}``). A bad path or value
names the key and the valid choices, as config errors do; the result is validated as a whole config again.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import sys
import types
import typing
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from memc.config import ToolchainConfig, config_data, parse_config
from memc.errors import ConfigError
from memc.schema import coerce, from_dict, to_dict, type_name, unknown_key_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_INDEX = re.compile(r"\[(\d+)\]")
_PIPELINE = object()  # walking markers: the pipeline list, one of its entries (a pass name + that pass's options)
_ENTRY = object()


def parse_set_args(items: typing.Sequence[str]) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}`` (a later ``--set`` of the same key wins)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set target.opset=21 or --set pipeline.0.window=64")
        out[key.strip()] = value
    return out


def apply_overrides(
    cfg: ToolchainConfig, overrides: Mapping[str, Any], *, origin: str = "override", from_text: bool = False
) -> ToolchainConfig:
    """A new config with ``overrides`` applied; ``from_text``: values are command-line text typed by the schema.

    Errors start with ``origin`` (``--set`` or ``override``) and the key path.
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides: expected a dict of 'key.path' -> value, got {type(overrides).__name__}")
    if not overrides:
        return cfg
    data = config_data(cfg)
    data["pipeline"] = [e if isinstance(e, dict) else _InstanceEntry(e) for e in data["pipeline"]]
    for key, value in overrides.items():
        try:
            _apply(data, key, value, from_text)
        except ConfigError as exc:
            raise ConfigError(f"{origin} {exc.args[0]}", hint=exc.hint) from None
    try:
        if isinstance(data["pipeline"], list):
            data["pipeline"] = [
                e.rebuilt(f"pipeline[{i}]") if isinstance(e, _InstanceEntry) else e for i, e in enumerate(data["pipeline"])
            ]
        return parse_config(data)
    except ConfigError as exc:
        keys = ", ".join(map(str, overrides))
        raise ConfigError(f"{exc.args[0]} (after {origin} {keys})", hint=exc.hint) from None


def _segments(key: Any) -> list[str]:
    if not isinstance(key, str):
        raise ConfigError(f"{key!r}: override keys are strings, e.g. 'target.opset'")
    segments = _INDEX.sub(r".\1", key).split(".")
    if not key or any(not s.strip() for s in segments):
        raise ConfigError(f"{key!r}: not a key path (dotted keys, list entries by index: target.opset, pipeline.1.window)")
    return [s.strip() for s in segments]


def _join(path: str, seg: str | int) -> str:
    return f"{path}[{seg}]" if isinstance(seg, int) else (f"{path}.{seg}" if path else seg)


def _optional_inner(tp: Any) -> Any:
    """``X | None`` -> X, so a table or list behind an optional can be walked into."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _index(container: list, seg: str, path: str) -> int:
    if not seg.isdigit():
        indices = f"an index 0..{len(container) - 1}" if container else "an index (it has no entries yet)"
        raise ConfigError(f"{_join(path, seg)}: {path} is a list; use {indices}")
    i = int(seg)
    if i >= len(container):
        have = f"entries 0..{len(container) - 1}" if container else "no entries"
        raise ConfigError(f"{_join(path, i)}: index out of range; {path} has {have}")
    return i


class _InstanceEntry(dict):
    """A Pass instance's pipeline entry as a table (``pass`` + its options) while overrides are applied."""

    def __init__(self, instance: Any):
        super().__init__({"pass": instance.name, **to_dict(instance.config)})
        self.instance = instance

    def rebuilt(self, path: str) -> Any:
        """The instance itself when untouched; a copy with the new options re-validated; a plain table (a
        registered pass by name) when ``pass`` was set to another name."""
        original = {"pass": self.instance.name, **to_dict(self.instance.config)}
        if dict(self) == original:
            return self.instance
        if self["pass"] != self.instance.name:
            return dict(self)
        changed = copy.copy(self.instance)  # the caller's object keeps its config
        changed.config = from_dict(type(self.instance).Config, {k: v for k, v in self.items() if k != "pass"}, path)
        return changed


def _entry_class(entry: dict, path: str) -> type:
    if isinstance(entry, _InstanceEntry) and entry.get("pass") == entry.instance.name:
        return type(entry.instance)
    from memc.passes.base import create_pass, registered_passes

    name = entry.get("pass")
    if not isinstance(name, str):
        raise ConfigError(f"{path}.pass: required string naming a registered pass (see `memc passes`)")
    cls = registered_passes().get(name)
    if cls is None:
        create_pass(name, {}, path)  # raises the unknown-pass error listing the valid passes
    return cls


def _child(tp: Any, node: Any, seg: str, path: str) -> tuple[Any, str | int]:
    """The type of ``node[seg]`` and the key to index ``node`` with; errors name the valid keys."""
    tp = _optional_inner(tp)
    if tp is _PIPELINE:
        return _ENTRY, _index(node, seg, path)
    if tp is _ENTRY:
        if seg == "pass":
            return str, seg
        cls = _entry_class(node, path)
        hints = get_type_hints(cls.Config)
        names = [f.name for f in dataclasses.fields(cls.Config)]
        if seg not in names:
            raise unknown_key_error(path, seg, names)
        return hints[seg], seg
    if dataclasses.is_dataclass(tp):
        hints = get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if seg not in names:
            raise unknown_key_error(path, seg, names)
        return (_PIPELINE if tp is ToolchainConfig and seg == "pipeline" else hints[seg]), seg
    origin = get_origin(tp)
    if origin is list:
        return get_args(tp)[0], _index(node, seg, path)
    if origin is dict:
        return get_args(tp)[1], seg
    raise ConfigError(f"{_join(path, seg)}: {path} holds {type_name(tp)}, not a table or a list")


def _admits_text(tp: Any) -> bool:
    tp = _optional_inner(tp)
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return any(_admits_text(a) for a in get_args(tp))
    return False


def typed_value(text: str, tp: Any) -> Any:
    """Command-line text as a value of ``tp``: as is where a string fits, else a TOML value (else the text, which
    the type check then rejects with the key path)."""
    if _admits_text(tp):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _check(value: Any, tp: Any, path: str) -> Any:
    if tp is _PIPELINE:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected an array of tables, e.g. [{{pass = \"eliminate-dead-code\"}}]")
        return value
    if tp is _ENTRY:
        return value  # a table or a Pass instance: parse_config checks it with the right path
    return coerce(value, tp, path)


def _apply(data: dict[str, Any], key: Any, value: Any, from_text: bool) -> None:
    segments = _segments(key)
    tp: Any = ToolchainConfig
    node: Any = data
    path = ""
    for i, seg in enumerate(segments):
        child_tp, k = _child(tp, node, seg, path)
        path = _join(path, k)
        if i == len(segments) - 1:
            break
        node, tp = (node.get(k) if isinstance(node, dict) else node[k]), child_tp
        if node is None:
            raise ConfigError(f"{path}: is not set; set {path} as a whole first")
    if from_text:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: command-line values are text, got {type(value).__name__}")
        value = typed_value(value, child_tp)
    checked = _check(value, child_tp, path)
    node[k] = to_dict(checked) if dataclasses.is_dataclass(checked) else checked
