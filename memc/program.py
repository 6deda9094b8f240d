"""Program: the unit that flows through memc's pipeline (capture -> passes -> codegen -> target)."""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim


@dataclass(frozen=True)
class DimSpec:
    """A dynamic axis: a name shared by every input axis that must agree, and its inclusive range."""

    name: str
    min: int
    max: int | None = None  # None: unbounded

    def to_torch(self) -> Any:
        return Dim(self.name, min=self.min, max=self.max) if self.max is not None else Dim(self.name, min=self.min)


@dataclass(frozen=True)
class SourceInfo:
    """Where the program came from; recorded in every report."""

    path: str
    kind: str  # pt2 | hf | factory | pickle
    sha256: str  # of the file, or of the directory's files in sorted order; "" for factories
    task: str = "generic"  # causal-lm | encoder | generic
    vocab_size: int | None = None
    max_seq_len: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassRecord:
    """What one pass did: written to report.json and the summary table."""

    name: str
    options: dict[str, Any]
    seconds: float
    changed: bool
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Program:
    """An exported graph plus everything passes and targets need to know about it.

    ``module`` is ``ExportedProgram.module()``: weights are attributes a pass can slice, replace or train, and every
    node keeps ``meta["nn_module_stack"]`` so results stay attributable to the original module paths.
    ``annotations`` hold what analysis passes found (e.g. ``"sites.attention"``); passes declare the keys they
    require and invalidate, and the PassManager checks them.
    """

    module: torch.fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_dims: dict[str, dict[int, DimSpec]]
    source: SourceInfo
    annotations: dict[str, Any] = field(default_factory=dict)
    log: list[PassRecord] = field(default_factory=list)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.module(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def replace(self, **changes: Any) -> "Program":
        return dataclasses.replace(self, **changes)

    def dynamic_shapes(self) -> dict[str, dict[int, Any] | None] | None:
        """torch.export ``dynamic_shapes`` for re-exporting ``module``."""
        return export_dynamic_shapes(self.input_names, self.dynamic_dims)

    def export(self) -> torch.export.ExportedProgram:
        """Re-export the (possibly rewritten) module, keeping the captured dynamic axes."""
        return torch.export.export(
            self.module, self.example_inputs, dynamic_shapes=self.dynamic_shapes(), strict=False
        )

    # -- facts for reports and `memc inspect` ---------------------------------------------------------------------
    def parameter_stats(self) -> tuple[int, int]:
        """(parameter count, parameter bytes), counting tied weights once."""
        return _tensor_stats(self.module.parameters())

    def buffer_stats(self) -> tuple[int, int]:
        """(buffer elements, buffer bytes): rotary tables, position ids and other non-trained state."""
        return _tensor_stats(self.module.buffers())

    def op_histogram(self) -> dict[str, int]:
        """How many times each op appears in the graph (asserts and shape bookkeeping included)."""
        counts = collections.Counter(
            str(n.target) for n in self.module.graph.nodes if n.op in ("call_function", "call_method")
        )
        return dict(counts.most_common())


def export_dynamic_shapes(
    input_names: list[str], dims: dict[str, dict[int, DimSpec]]
) -> dict[str, dict[int, Any] | None] | None:
    """torch.export ``dynamic_shapes`` with one Dim object per shared name (so shared axes stay equal)."""
    if not any(dims.values()):
        return None
    made: dict[str, Any] = {}
    return {
        name: {a: made.setdefault(s.name, s.to_torch()) for a, s in dims.get(name, {}).items()} or None
        for name in input_names
    }


def _tensor_stats(tensors: Any) -> tuple[int, int]:
    seen: set[int] = set()
    count = nbytes = 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        count += t.numel()
        nbytes += t.numel() * t.element_size()
    return count, nbytes


def module_path(node: torch.fx.Node) -> str:
    """The innermost owning module of a node (``model.layers.0.self_attn``), or '' at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path
