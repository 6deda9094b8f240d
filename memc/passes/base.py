"""The pass contract, the pass context and the registry (built-ins by decorator, plugins by entry point).

A pass is a small object: a name, a typed ``Config`` dataclass, the program annotations it ``requires``,
``provides`` and ``invalidates``, and ``run(program, ctx) -> PassResult``. The PassManager checks the contract;
instruments (verification, IR dumps, progress) observe passes without the passes knowing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.metadata
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch

from memc.errors import ConfigError
from memc.program import Program
from memc.schema import from_dict

ENTRY_POINT_GROUP = "memc.passes"


@dataclass
class NoOptions:
    """A pass without options."""


@dataclass
class PassResult:
    program: Program
    changed: bool
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What every pass may use besides the program: seed, calibration samples, progress, scratch space.

    ``progress(total, description)`` yields a callable that advances a progress display; passes that loop over
    layers or batches call it so long work is visible without each pass knowing about terminals.
    """

    seed: int = 0
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    config: Any = None  # the whole validated ToolchainConfig (read-only for passes)
    progress_factory: Callable[[int, str], contextlib.AbstractContextManager[Callable[[int], None]]] | None = None

    @contextlib.contextmanager
    def progress(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        if self.progress_factory is None:
            yield lambda n=1: None
            return
        with self.progress_factory(total, description) as advance:
            yield advance


class Pass:
    """Base class of every memc pass (built-in or plugin).

    ``tolerance`` is the max |Δ| of the program's outputs this pass may introduce: 0 for exact rewrites (the
    verification instrument then uses the configured ``pass_atol`` for float noise); approximate passes
    (quantization, distillation) set ``None`` and report their own quality metrics instead.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    tolerance: ClassVar[float | None] = 0.0

    path: str = ""  # where the options came from (``pipeline[1]``); set by create_pass, named in errors

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def option_path(self, option: str) -> str:
        """``pipeline[1].window``: the key path a user fixes when an option's value is wrong for this program."""
        return f"{self.path or self.name}.{option}"

    def run(self, program: Program, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, type[Pass]] = {}
_ORIGINS: dict[str, str] = {}
_PLUGINS_LOADED = False
_PLUGIN_ERRORS: list[str] = []


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to toolchain.toml and ``memc passes``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"@register_pass expects a Pass subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} must define a non-empty class attribute 'name'")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__qualname__}.Config must be a dataclass")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise TypeError(f"pass name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    _ORIGINS.setdefault(name, cls.__module__)
    return cls


def _load_plugins() -> None:
    """Import third-party passes from the ``memc.passes`` entry-point group, once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Pass):
                register_pass(obj)
                _ORIGINS[obj.name] = f"plugin {ep.dist.name if ep.dist else ep.value}"
            else:  # a module whose import registered its passes
                for name, cls in _REGISTRY.items():
                    if cls.__module__.startswith(ep.value.split(":")[0]):
                        _ORIGINS[name] = f"plugin {ep.dist.name if ep.dist else ep.value}"
        except Exception as exc:  # a broken plugin must not break memc; it is reported by `memc passes`
            msg = f"plugin entry point {ep.name} = {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
            _PLUGIN_ERRORS.append(msg)
            warnings.warn(msg, stacklevel=2)


def registered_passes() -> dict[str, type[Pass]]:
    import memc.passes.builtin  # noqa: F401  (registers the built-in passes)

    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def pass_origin(name: str) -> str:
    return _ORIGINS.get(name, "?")


def plugin_errors() -> list[str]:
    return list(_PLUGIN_ERRORS)


def create_pass(name: str, options: dict[str, Any], path: str) -> Pass:
    """Instantiate a registered pass with validated options; errors name ``path`` and the valid choices."""
    passes = registered_passes()
    cls = passes.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{path}.pass: unknown pass {name!r}. {hint}Valid passes: {', '.join(passes) or '(none)'} (see `memc passes`)"
        )
    instance = cls(from_dict(cls.Config, options, path))
    instance.path = path
    return instance
