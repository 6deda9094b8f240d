"""One loader per source kind; all of them end in ``torch.export.export(strict=False)`` and a Program."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
import sys
from pathlib import Path

import sympy
import torch
from torch.export import Dim

from memc.capture.hf import load_hf
from memc.capture.inputs import dims_from_specs, tensor_from_spec, token_inputs
from memc.config import ToolchainConfig
from memc.errors import CaptureError, first_line
from memc.program import DimSpec, Program, SourceInfo, export_dynamic_shapes

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def resolve_kind(source: str, kind: str = "auto") -> str:
    """Decide how to load ``source``; errors say what a valid source looks like."""
    if kind != "auto":
        return kind
    path = Path(source)
    if path.exists():
        if path.is_dir():
            if (path / "config.json").is_file():
                return "hf"
            raise CaptureError(
                f"{source} is a directory but not a model: it has no config.json",
                hint="pass a Hugging Face model directory (config.json + *.safetensors), a .pt2 archive, "
                "or package.module:function",
            )
        if path.suffix == ".pt2":
            return "pt2"
        if path.suffix in PICKLE_SUFFIXES:
            return "pickle"
        raise CaptureError(
            f"{source}: unrecognised model file type {path.suffix or '(no suffix)'!r}",
            hint="expected .pt2 (torch.export.save), .pt/.pth/.pkl (pickled nn.Module), or a model directory",
        )
    if _FACTORY.match(source) and not source.endswith((".pt2",) + PICKLE_SUFFIXES):
        return "factory"
    raise CaptureError(f"model path does not exist: {source}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _export(module: torch.nn.Module, inputs: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture the model: {first_line(exc)}",
            hint="static shapes often help: set inputs.dynamic_batch / dynamic_seq = false or drop "
            "'dynamic' from [[inputs.tensors]]",
        ) from None


def _finite_int(value) -> int | None:
    """sympy bound -> int, or None for torch's unbounded int_oo."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _dims_from_exported(ep: torch.export.ExportedProgram, names: list[str]) -> dict[str, dict[int, DimSpec]]:
    """Read the dynamic axes torch.export actually kept (for .pt2 archives and Dim.AUTO captures)."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user_inputs = list(ep.graph_signature.user_inputs)
    dims: dict[str, dict[int, DimSpec]] = {}
    for name, node_name in zip(names, user_inputs):
        val = placeholders[node_name].meta.get("val")
        axes = {}
        for axis, size in enumerate(getattr(val, "shape", ())):
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if isinstance(expr, sympy.Symbol):  # constants and derived expressions are not input dims
                rng = ep.range_constraints.get(expr)
                low = int(rng.lower) if rng is not None else 0
                high = _finite_int(rng.upper) if rng is not None else None
                axes[axis] = DimSpec(str(expr), max(low, 0), high)
        dims[name] = axes
    return dims


def _program(ep, inputs, names, outputs, dims, source: SourceInfo) -> Program:
    gm = ep.module()
    n_out = len(gm.graph.output_node().args[0]) if isinstance(gm.graph.output_node().args[0], (tuple, list)) else 1
    outputs = outputs if len(outputs) == n_out else [f"output_{i}" for i in range(n_out)]
    return Program(gm, tuple(inputs), list(names), outputs, dims, source)


def _forward_names(module: torch.nn.Module, count: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < count:
        raise CaptureError(f"the model's forward() takes {len(params)} positional inputs but {count} were given")
    return params[:count]


def _capture_module(module: torch.nn.Module, provided: tuple | None, cfg: ToolchainConfig, source: SourceInfo) -> Program:
    """Factories and pickles: inputs from [[inputs.tensors]], else from the factory; dims explicit or Dim.AUTO."""
    module = module.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    specs = cfg.inputs.tensors
    if specs:
        names = _forward_names(module, len(specs))
        by_name = {s.name: s for s in specs}
        unknown = sorted(set(by_name) - set(names))
        if unknown:
            raise CaptureError(f"inputs.tensors names {unknown} are not forward() arguments {names}")
        ordered = [by_name[n] for n in names]
        inputs = tuple(tensor_from_spec(s, gen) for s in ordered)
        dims = dims_from_specs(ordered)
        ep = _export(module, inputs, export_dynamic_shapes(names, dims))
    elif provided is not None:
        inputs = tuple(provided)
        names = _forward_names(module, len(inputs))
        shapes = {n: {a: Dim.AUTO for a in range(t.dim())} for n, t in zip(names, inputs)}
        ep = _export(module, inputs, shapes)
        dims = _dims_from_exported(ep, names)
    else:
        raise CaptureError(
            f"memc cannot infer example inputs for the {source.kind} model {source.path}",
            hint="list them in toolchain.toml as [[inputs.tensors]] (name, shape, dtype, dynamic), "
            "or return (module, example_inputs) from the factory",
        )
    return _program(ep, inputs, names, [], dims, source)


def _load_pt2(path: Path, cfg: ToolchainConfig) -> Program:
    export_log = logging.getLogger("torch.export")  # it logs a traceback for a corrupt archive before raising
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise CaptureError(f"{path} is not a readable torch.export archive (corrupt or truncated?): {first_line(exc)}") from None
    finally:
        export_log.setLevel(level)
    names = list(ep.graph_signature.user_inputs)
    gen = torch.Generator().manual_seed(cfg.seed)
    if ep.example_inputs is not None and not ep.example_inputs[1]:
        inputs = tuple(ep.example_inputs[0])
    elif cfg.inputs.tensors:
        inputs = tuple(tensor_from_spec(s, gen) for s in cfg.inputs.tensors)
    else:
        raise CaptureError(f"{path} carries no example inputs", hint="list them in toolchain.toml as [[inputs.tensors]]")
    source = SourceInfo(str(path), "pt2", _sha256(path))
    return _program(ep, inputs, names, [], _dims_from_exported(ep, names), source)


def _load_hf_dir(path: Path, cfg: ToolchainConfig) -> Program:
    hf = load_hf(path, cfg.model.task, cfg.model.dtype)
    max_seq = cfg.inputs.max_seq_len or hf.max_seq_len
    if max_seq is not None and cfg.inputs.seq_len > max_seq:
        raise CaptureError(f"inputs.seq_len {cfg.inputs.seq_len} exceeds the model's maximum {max_seq}")
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = token_inputs(hf.input_names, cfg.inputs.batch, cfg.inputs.seq_len, hf.vocab_size, gen)
    axes: dict[int, DimSpec] = {}
    if cfg.inputs.dynamic_batch:
        axes[0] = DimSpec("batch", 1, None)
    if cfg.inputs.dynamic_seq:
        axes[1] = DimSpec("seq", 1, max_seq)
    dims = {n: dict(axes) for n in hf.input_names}
    source = SourceInfo(
        str(path), "hf", _sha256(path), hf.task, hf.vocab_size, max_seq,
        {"architecture": hf.architecture, "moe": hf.is_moe, "attention": hf.attention},
    )
    ep = _export(hf.module, inputs, export_dynamic_shapes(hf.input_names, dims))
    return _program(ep, inputs, hf.input_names, hf.output_names, dims, source)


def _load_factory(spec: str, cfg: ToolchainConfig) -> Program:
    module_name, func_name = spec.split(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:
        raise CaptureError(f"cannot import factory module {module_name!r}: {first_line(exc)}") from None
    finally:
        sys.path.pop(0)
    func = getattr(mod, func_name, None)
    if not callable(func):
        raise CaptureError(f"{module_name} has no callable {func_name!r}")
    try:
        made = func()
    except Exception as exc:
        raise CaptureError(f"factory {spec} raised {first_line(exc)}") from None
    module, provided = (made[0], made[1]) if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"factory {spec} returned {type(module).__name__}, expected an nn.Module (or (module, inputs))")
    source = SourceInfo(spec, "factory", hashlib.sha256(inspect.getsource(mod).encode()).hexdigest())
    return _capture_module(module, provided, cfg, source)


def _load_pickle(path: Path, cfg: ToolchainConfig, trust_pickle: bool) -> Program:
    if not trust_pickle:
        raise CaptureError(
            f"refusing to load {path}: it is a pickle, and unpickling can run arbitrary code",
            hint="if you trust where it came from, rerun with --trust-pickle; better, save the model with "
            "torch.export.save(...) as a .pt2 archive, which memc loads safely",
        )
    try:
        obj = torch.load(str(path), weights_only=False)
    except Exception as exc:
        raise CaptureError(f"{path} is not a readable pickled model: {first_line(exc)}") from None
    if isinstance(obj, dict):
        raise CaptureError(
            f"{path} holds a state_dict, not an nn.Module",
            hint="a state_dict has no architecture: use a factory (package.module:function) that builds the model and loads it",
        )
    if not isinstance(obj, torch.nn.Module):
        raise CaptureError(f"{path} holds a {type(obj).__name__}, expected an nn.Module")
    return _capture_module(obj, None, cfg, SourceInfo(str(path), "pickle", _sha256(path)))


def capture(source: str, cfg: ToolchainConfig, *, trust_pickle: bool = False) -> Program:
    """Load ``source`` and capture it into a Program (seeded by ``cfg.seed``)."""
    kind = resolve_kind(source, cfg.model.kind)
    path = Path(source)
    if kind in ("pt2", "hf", "pickle") and not path.exists():
        raise CaptureError(f"model path does not exist: {source}")
    if kind == "pt2":
        return _load_pt2(path, cfg)
    if kind == "hf":
        return _load_hf_dir(path, cfg)
    if kind == "pickle":
        return _load_pickle(path, cfg, trust_pickle)
    if not _FACTORY.match(source):
        raise CaptureError(f"factory sources look like package.module:function, got {source!r}")
    return _load_factory(source, cfg)
