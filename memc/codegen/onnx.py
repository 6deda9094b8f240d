"""Lower a Program to ONNX with torch.onnx's dynamo exporter, after checking every op can be expressed.

The check runs the exporter's own decomposition and dispatch on the exported program, so an unsupported op is
reported by node name and owning module *before* anything is written, instead of as an exporter traceback. The
lowering of the same exported program then reuses that decomposition instead of running it again (a re-trace of
the whole graph: about a sixth of a compile's time).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass

import onnx
import torch

from memc.codegen.fusion import fuse_for_onnxruntime
from memc.codegen.peephole import simplify_gqa_layouts
from memc.codegen.quant import share_reshaped_initializers, store_half_scales
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
def quiet():
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

    registry = _registration.ONNXRegistry.from_torchlib(opset)
    for target, fn in custom_translations().items():
        registry.register_op(target, fn)
    return registry


def custom_translations() -> dict:
    """Translations of memc's own torch ops (memc.nn, memc.codegen.attention) for the exporter."""
    from memc.codegen import attention, quant

    return {**quant.translations(), **attention.translations()}


def find_unsupported(ep: torch.export.ExportedProgram, opset: int) -> list[UnsupportedNode]:
    """Nodes the ONNX exporter has no translation for at ``opset`` (after its own decompositions)."""
    from torch.onnx._internal.exporter import _core, _dispatching

    with quiet():
        registry = _registry(opset)
        decomposed = _core._prepare_exported_program_for_export(ep, registry=registry)
    _DECOMPOSED.clear()  # only the latest check is kept: a check is followed by its lowering or by nothing
    _DECOMPOSED[id(ep)] = (ep, opset, decomposed)
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


# ep id -> (ep, opset, its decomposition) from the last check, taken (once) by the lowering of that same ep at that
# opset. The ep is held so its id cannot be reused by another object while the entry exists.
_DECOMPOSED: dict[int, tuple[torch.export.ExportedProgram, int, torch.export.ExportedProgram]] = {}


@contextlib.contextmanager
def _checked_decomposition(ep: torch.export.ExportedProgram, opset: int):
    """While lowering ``ep``, let the exporter take the decomposition ``find_unsupported`` already computed for it
    (same registry: torchlib at ``opset`` plus memc's translations; torchlib starts at its own minimum opset, so
    below it the exporter's registry differs and nothing is reused)."""
    from torch.onnx._internal.exporter import _constants, _core

    entry = _DECOMPOSED.pop(id(ep), None)
    if entry is None or entry[0] is not ep or entry[1] != opset or opset < _constants.TORCHLIB_OPSET:
        yield
        return
    original = _core._prepare_exported_program_for_export

    def prepared(exported_program, *, registry):
        if exported_program is ep:
            return entry[2]
        return original(exported_program, registry=registry)

    _core._prepare_exported_program_for_export = prepared
    try:
        yield
    finally:
        _core._prepare_exported_program_for_export = original


def check_exportable(ep: torch.export.ExportedProgram, opset: int) -> None:
    bad = find_unsupported(ep, opset)
    if bad:
        lines = "\n  ".join(str(b) for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UnsupportedError(
            f"the onnx target cannot express {len(bad)} node(s) at opset {opset}:\n  {lines}{more}",
            hint="rewrite these ops with standard torch ops, or add a pass that replaces them",
        )


def rename_dims(model: onnx.ModelProto, dim_names: dict[str, dict[int, str]]) -> None:
    """Give dynamic axes memc's names (batch, seq, ...) instead of the exporter's symbols (s72, ...).

    ``dim_names`` maps a graph input name to ``{axis: name}``. The exporter's symbol on that axis is renamed
    everywhere, inside derived expressions too (an output axis ``s15 + s70`` becomes ``past + seq``).
    """
    rename: dict[str, str] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, name in dim_names.get(value.name, {}).items():
            if axis < len(dims) and dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, name)
    if not rename:
        return
    symbol = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(rename, key=len, reverse=True)) + r")\b")
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: rename[m.group(1)], dim.dim_param)


# What the exporter attaches beyond the computation: per-node metadata (name scopes mapping nodes to module paths,
# stack traces and FX dumps that hold absolute paths of this machine, so non-deterministic) and value_info (shapes
# of intermediate values, which onnxruntime and TensorRT infer again). On ref-llama they are ~110 KB, 4% of an
# int4 artifact that a byte budget must pay for, so a deployment artifact carries none of them; `debug_metadata`
# keeps everything for debugging a lowering.
_EXPORTER_METADATA = "pkg.torch.onnx."


def strip_exporter_metadata(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if not p.key.startswith(_EXPORTER_METADATA)]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    del model.graph.value_info[:]


def lower_exported(
    ep: torch.export.ExportedProgram,
    example_inputs: tuple,
    input_names: list[str],
    output_names: list[str],
    dim_names: dict[str, dict[int, str]],
    opset: int,
    optimize: bool = True,
    debug_metadata: bool = False,
) -> onnx.ModelProto:
    """An exported program as an ONNX model (dynamo exporter, quietly), with the given input/output names, dynamic
    axes renamed per ``dim_names`` and, unless ``debug_metadata``, the exporter's metadata stripped."""
    with quiet(), _checked_decomposition(ep, opset):
        onnx_program = torch.onnx.export(
            ep,
            example_inputs,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            optimize=optimize,
            verbose=False,
            custom_translation_table=custom_translations(),
        )
    model = onnx_program.model_proto
    store_half_scales(model)
    share_reshaped_initializers(model)
    rename_dims(model, dim_names)
    simplify_gqa_layouts(model)
    if uses_onnxruntime_ops(model):
        fuse_for_onnxruntime(model)
    if not debug_metadata:
        strip_exporter_metadata(model)
    model.producer_name = "memc"
    return model


def uses_onnxruntime_ops(model: onnx.ModelProto) -> bool:
    """The graph was lowered for onnxruntime (it has com.microsoft ops, e.g. GroupQueryAttention): onnxruntime's
    fused kernels (memc.codegen.fusion) then apply too."""
    return any(n.domain == "com.microsoft" for n in model.graph.node)


def export_onnx(
    program: Program, ep: torch.export.ExportedProgram, opset: int, optimize: bool = True, debug_metadata: bool = False
) -> onnx.ModelProto:
    """The Program as an ONNX model with memc's input/output names and dimension names."""
    dim_names = {name: {a: spec.name for a, spec in axes.items()} for name, axes in program.dynamic_dims.items()}
    return lower_exported(
        ep, program.example_inputs, program.input_names, program.output_names, dim_names, opset, optimize,
        debug_metadata,
    )
