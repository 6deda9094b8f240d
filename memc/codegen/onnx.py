"""Lower a Program to ONNX with torch.onnx's dynamo exporter, after checking every op can be expressed.

The check runs the exporter's own decomposition and dispatch on the exported program, so an unsupported op is
reported by node name and owning module *before* anything is written, instead of as an exporter traceback.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass

import onnx
import torch

from memc.errors import UnsupportedError
from memc.program import Program, module_path


@dataclass
class UnsupportedNode:
    node: str
    op: str
    module: str
    reason: str

    def __str__(self) -> str:
        where = f"module {self.module!r}" if self.module else "the top-level forward"
        return f"node {self.node!r} ({self.op}) in {where}: {self.reason}"


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings meant for its own developers; keep memc's output readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def _registry(opset: int):
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib(opset)


def find_unsupported(ep: torch.export.ExportedProgram, opset: int) -> list[UnsupportedNode]:
    """Nodes the ONNX exporter has no translation for at ``opset`` (after its own decompositions)."""
    from torch.onnx._internal.exporter import _core, _dispatching

    with _quiet():
        registry = _registry(opset)
        decomposed = _core._prepare_exported_program_for_export(ep, registry=registry)
    found = []
    for node in decomposed.graph.nodes:
        if node.op != "call_function":
            continue
        fn, message = _dispatching.dispatch(node, registry)
        if fn is None:
            reason = "no ONNX translation is registered for this op"
            if "real-valued" not in message and message:
                reason = message.strip().splitlines()[0]
            found.append(UnsupportedNode(node.name, str(node.target), module_path(node), reason))
    return found


def check_exportable(ep: torch.export.ExportedProgram, opset: int) -> None:
    bad = find_unsupported(ep, opset)
    if bad:
        lines = "\n  ".join(str(b) for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UnsupportedError(
            f"the onnx target cannot express {len(bad)} node(s) at opset {opset}:\n  {lines}{more}",
            hint="rewrite these ops with standard torch ops, or add a pass that replaces them",
        )


def _rename_dims(model: onnx.ModelProto, program: Program) -> None:
    """Give dynamic axes memc's names (batch, seq, ...) instead of the exporter's symbols (s72, ...)."""
    rename: dict[str, str] = {}
    for value, name in zip(model.graph.input, program.input_names):
        dims = value.type.tensor_type.shape.dim
        for axis, spec in program.dynamic_dims.get(name, {}).items():
            if axis < len(dims) and dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, spec.name)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


# Node metadata the exporter attaches: name scopes map ONNX nodes back to module paths and are kept; stack traces
# and FX dumps hold absolute paths of this machine (non-deterministic artifacts) and triple the file size.
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy")


def _strip_debug_metadata(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def export_onnx(
    program: Program, ep: torch.export.ExportedProgram, opset: int, optimize: bool = True, debug_metadata: bool = False
) -> onnx.ModelProto:
    """The Program as an ONNX model with memc's input/output names and dimension names."""
    with _quiet():
        onnx_program = torch.onnx.export(
            ep,
            program.example_inputs,
            dynamo=True,
            opset_version=opset,
            input_names=program.input_names,
            output_names=program.output_names,
            optimize=optimize,
            verbose=False,
        )
    model = onnx_program.model_proto
    _rename_dims(model, program)
    if not debug_metadata:
        _strip_debug_metadata(model)
    model.producer_name = "memc"
    return model
