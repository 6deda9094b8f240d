"""In-memory sources for the Python API: an ``nn.Module`` with example inputs, or a ``torch.export.ExportedProgram``.

Everything that can be checked without exporting (input types, dynamic-axis names and ranks) is checked when the
source is described, so ``memc.compile`` fails before any work, like a bad path does.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from memc.capture.inputs import tensor_from_spec
from memc.capture.loaders import _capture_module, _dims_from_exported, _export, _forward_names, _program
from memc.config import ToolchainConfig
from memc.errors import CaptureError, ConfigError
from memc.program import DimSpec, Program, SourceInfo, export_dynamic_shapes

DynamicAxes = Mapping[str, Mapping[int, str]]  # input name -> {axis: dimension name}, like [[inputs.tensors]] dynamic


@dataclass
class InMemorySource:
    """A model given as a Python object: what the plan prints and how it is captured."""

    kind: str  # module | exported-program
    description: str
    capture: Callable[[ToolchainConfig], Program]


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _digest(state: Mapping[str, torch.Tensor], *texts: str) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes) and ``texts``: same model -> same report."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _class_source(module: torch.nn.Module) -> str:
    try:
        return inspect.getsource(type(module))
    except (OSError, TypeError):  # defined in a REPL or exec'd code: the qualified name stands in for it
        return _qualname(module)


def own_weights(program: Program) -> Program:
    """Give the captured graph its own copies of parameters and buffers.

    ``ep.module()`` shares storage with the module it was exported from; passes that change weights in place
    (training, calibration) must not change the caller's model. Tied weights stay tied.
    """
    memo: dict[tuple, torch.Tensor] = {}

    def own(t: torch.Tensor, param: bool) -> torch.Tensor:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), param)
        if key not in memo:
            copy = t.detach().clone()
            memo[key] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if param else copy
        return memo[key]

    for mod in program.module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = own(p, True)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = own(b, False)
    return program


def example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """A tensor or a tuple/list of tensors (one per positional forward() argument); anything else is refused."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        got = "an empty sequence" if isinstance(example_inputs, (tuple, list)) else type(example_inputs).__name__
        raise CaptureError(
            f"example_inputs must be a torch.Tensor or a non-empty tuple of them (one per positional forward() "
            f"argument), got {got}",
            hint="e.g. memc.compile(model, example_inputs=(torch.randn(2, 16),))",
        )
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise CaptureError(
                f"example_inputs[{i}] is a {type(t).__module__}.{type(t).__name__}, expected a torch.Tensor",
                hint="convert it first, e.g. torch.as_tensor(x)",
            )
    return tuple(example_inputs)


def _check_axes(axes: Any, names: list[str], inputs: tuple[torch.Tensor, ...]) -> dict[str, dict[int, DimSpec]]:
    if not isinstance(axes, Mapping):
        raise ConfigError(f"dynamic_axes: expected a dict input name -> {{axis: dimension name}}, got {type(axes).__name__}")
    rank = {n: t.dim() for n, t in zip(names, inputs)}
    dims: dict[str, dict[int, DimSpec]] = {n: {} for n in names}
    for name, spec in axes.items():
        if name not in rank:
            raise ConfigError(f"dynamic_axes[{name!r}]: not an input; the model's inputs are {names}")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"dynamic_axes[{name!r}]: expected {{axis: dimension name}}, got {type(spec).__name__}")
        for axis, dim in spec.items():
            where = f"dynamic_axes[{name!r}][{axis!r}]"
            if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < rank[name]:
                raise ConfigError(f"{where}: not an axis of {name} (rank {rank[name]}: axes 0..{rank[name] - 1})")
            if not isinstance(dim, str) or not dim.isidentifier():
                raise ConfigError(f"{where}: the dimension name must be an identifier string, got {dim!r}")
            dims[name][axis] = DimSpec(dim, 1, None)
    return dims


def module_source(module: torch.nn.Module, example_inputs: Any, dynamic_axes: DynamicAxes | None,
                  cfg: ToolchainConfig) -> InMemorySource:
    """An nn.Module: captured with ``example_inputs`` (or ``[[inputs.tensors]]``); every axis Dim.AUTO unless
    ``dynamic_axes`` names the dynamic ones (the others are then static)."""
    description = f"<in-memory {_qualname(module)}>"
    if example_inputs is None and not cfg.inputs.tensors:
        raise CaptureError(
            f"memc cannot infer example inputs for the in-memory module {_qualname(module)}",
            hint="pass example_inputs=(tensor, ...) to memc.compile, or list them as [[inputs.tensors]] in the config",
        )
    inputs = example_tuple(example_inputs) if example_inputs is not None else None
    if inputs is not None and cfg.inputs.tensors:
        raise ConfigError("example_inputs and inputs.tensors both describe the inputs; give one of them")
    dims = None
    if dynamic_axes is not None:
        if inputs is None:
            raise ConfigError("dynamic_axes needs example_inputs (with [[inputs.tensors]], set their 'dynamic' keys)")
        dims = _check_axes(dynamic_axes, _forward_names(module, len(inputs)), inputs)

    def capture(config: ToolchainConfig) -> Program:
        source = SourceInfo(description, "module", _digest(module.state_dict(), _class_source(module)))
        modes = {m: m.training for m in module.modules()}  # capture runs in eval mode; the caller's model keeps its own
        try:
            if dims is None:
                return own_weights(_capture_module(module, inputs, config, source))
            names = list(dims)
            ep = _export(module.eval(), inputs, export_dynamic_shapes(names, dims))
            return own_weights(_program(ep, inputs, names, [], dims, source))
        finally:
            for m, training in modes.items():
                m.training = training

    return InMemorySource("module", description, capture)


def exported_source(ep: torch.export.ExportedProgram, example_inputs: Any, dynamic_axes: DynamicAxes | None,
                    cfg: ToolchainConfig) -> InMemorySource:
    """An ExportedProgram: its dynamic axes are already decided; inputs from ``example_inputs``, the program's own
    example inputs, or ``[[inputs.tensors]]``."""
    if dynamic_axes is not None:
        raise ConfigError("dynamic_axes does not apply to an ExportedProgram: its dynamic axes were fixed by torch.export")
    names = list(ep.graph_signature.user_inputs)
    if example_inputs is not None:
        inputs: tuple | None = example_tuple(example_inputs)
        if len(inputs) != len(names):
            raise CaptureError(f"example_inputs has {len(inputs)} tensor(s); the ExportedProgram takes {len(names)}: {names}")
    elif ep.example_inputs is not None and not ep.example_inputs[1]:
        inputs = tuple(ep.example_inputs[0])
    elif cfg.inputs.tensors:
        inputs = None  # drawn from the specs at capture, with the config's seed
    else:
        raise CaptureError(
            "the ExportedProgram carries no example inputs",
            hint="pass example_inputs=(tensor, ...) to memc.compile, or list them as [[inputs.tensors]]",
        )
    description = "<in-memory torch.export.ExportedProgram>"

    def capture(config: ToolchainConfig) -> Program:
        if inputs is None:
            gen = torch.Generator().manual_seed(config.seed)
            example = tuple(tensor_from_spec(s, gen) for s in config.inputs.tensors)
        else:
            example = inputs
        source = SourceInfo(description, "exported-program", _digest(ep.state_dict, str(ep.graph)))
        return own_weights(_program(ep, example, names, [], _dims_from_exported(ep, names), source))

    return InMemorySource("exported-program", description, capture)
