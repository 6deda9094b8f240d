"""Pass instruments (after TVM's PassInstrument): observe every pass without touching it.

- ``VerifyInstrument`` runs the program before and after each pass on sample inputs and fails on the first
  diverging node, naming the module that owns it.
- ``IRDumpInstrument`` writes the graph after capture and after every pass.
- ``ProgressInstrument`` drives a terminal progress display over the pipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memc.errors import VerificationError
from memc.graph_values import record
from memc.program import Program, module_path


class Instrument:
    """Hooks called by the PassManager; override what you need."""

    def before_pass(self, program: Program, pass_: Any) -> None: ...

    def after_pass(self, program: Program, pass_: Any, metrics: dict[str, Any]) -> None: ...


def _record(program: Program, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[str, torch.Tensor], list]:
    """Every non-input node's tensor value (detached) and the program's outputs."""
    values, out = record(program.module, inputs, lambda n: n.op != "placeholder")
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return values, outs


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    if not a.is_floating_point():
        return float((a != b).any())
    return float((a.double() - b.double()).abs().max())


@dataclass
class Divergence:
    node: str
    module: str
    diff: float


class VerifyInstrument(Instrument):
    """Fails a pass whose outputs drift from the program before it beyond the pass's declared tolerance."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], atol: float):
        self.inputs = inputs
        self.atol = atol
        self._before: tuple[dict[str, torch.Tensor], list] | None = None

    def before_pass(self, program: Program, pass_: Any) -> None:
        self._before = _record(program, self.inputs) if pass_.tolerance is not None else None

    def after_pass(self, program: Program, pass_: Any, metrics: dict[str, Any]) -> None:
        if self._before is None:
            return
        values_before, outs_before = self._before
        self._before = None
        values_after, outs_after = _record(program, self.inputs)
        if len(outs_before) != len(outs_after):
            raise VerificationError(
                f"pass {pass_.name!r} changed the number of program outputs ({len(outs_before)} -> {len(outs_after)})"
            )
        diffs = [max_abs_diff(a, b) for a, b in zip(outs_before, outs_after)]
        worst = max(diffs, default=0.0)
        metrics["verify_max_abs_diff"] = worst
        limit = max(self.atol, pass_.tolerance or 0.0)
        if worst <= limit:
            return
        div = first_divergence(program.module, values_before, values_after, limit)
        where = f"; first diverging node {div.node!r} in module {div.module or '<top level>'!r} (max |Δ| {div.diff:.3g})" if div else ""
        raise VerificationError(
            f"pass {pass_.name!r} changed the program's outputs by max |Δ| {worst:.3g} > tolerance {limit:.3g}{where}"
        )


def first_divergence(
    gm: torch.fx.GraphModule, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], atol: float
) -> Divergence | None:
    """The earliest node (in the rewritten graph's order) present before and after whose value moved > atol."""
    for node in gm.graph.nodes:
        if node.name in before and node.name in after:
            d = max_abs_diff(before[node.name], after[node.name])
            if d > atol:
                return Divergence(node.name, module_path(node), d)
    return None


class IRDumpInstrument(Instrument):
    """Writes ``NN_<pass>.py`` (the graph as code) after capture and after each pass."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.index = 0

    def dump(self, program: Program, label: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.index:02d}_{label}.py"
        path.write_text(program.module.code, encoding="utf-8")
        self.index += 1

    def after_pass(self, program: Program, pass_: Any, metrics: dict[str, Any]) -> None:
        self.dump(program, pass_.name)


class ProgressInstrument(Instrument):
    """Advances one progress task per pass (the display itself is owned by the caller)."""

    def __init__(self, advance: Any):
        self.advance = advance

    def after_pass(self, program: Program, pass_: Any, metrics: dict[str, Any]) -> None:
        self.advance(1)
