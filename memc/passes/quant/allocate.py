"""The ``allocate-bits`` pass: one integer program choosing a format per tensor group under a byte budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memc.errors import ConfigError
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.quant.quantize import PLAN
from memc.passes.quant.sensitivity import SENSITIVITY
from memc.program import Program
from memc.quant.allocate import InfeasibleBudget, allocate, parse_budget
from memc.schema import option


@dataclass
class AllocateOptions:
    budget: str = option("", "artifact size: bytes ('1.6MB' = 1.6e6, '1.5MiB'), bits per parameter over all parameters ('3bits') or a fraction of the original ('0.1x'); `memc compile --budget` sets it")
    overhead_bytes: int = option(-1, "bytes the artifact stores besides the quantized tensors; -1: measured by quant-sensitivity")
    time_limit: float = option(60.0, "solver time limit in seconds")

    def validate(self) -> None:
        if self.budget:
            try:
                parse_budget(self.budget, 1, 1, "budget")
            except ConfigError as exc:  # from_dict prefixes the pipeline entry's key path
                raise ValueError(str(exc)) from None


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


@register_pass
class AllocateBits(Pass):
    """Choose each tensor group's format (scipy milp) so the artifact fits the byte budget with the least damage."""

    name = "allocate-bits"
    Config = AllocateOptions
    requires = frozenset({SENSITIVITY})
    provides = frozenset({PLAN})

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        info = program.annotations[SENSITIVITY]
        table = info["table"]
        if not self.config.budget:
            raise ConfigError("allocate-bits.budget: no budget; set it in the pipeline or pass `memc compile --budget 1.6MB`")
        budget = parse_budget(self.config.budget, info["total_params"], info["original_bytes"], "allocate-bits.budget")
        overhead = self.config.overhead_bytes
        if overhead < 0:
            overhead = info["graph_bytes"] if info["graph_bytes"] is not None else info["fixed_bytes"]
        scores, nbytes = np.array(table.scores), np.array(table.bytes)
        capacity = budget - overhead
        try:
            alloc = allocate(scores, nbytes, capacity, time_limit=self.config.time_limit)
        except InfeasibleBudget as exc:
            smallest = overhead + int(nbytes.min(1).sum())
            raise InfeasibleBudget(
                f"allocate-bits.budget: {self.config.budget!r} ({budget:,} bytes) is infeasible: the smallest artifact "
                f"these candidates can make is {smallest:,} bytes ({_mb(smallest)}: every group at its cheapest format "
                f"plus {overhead:,} bytes of graph and unquantized tensors) [{exc}]",
                hint=f"raise the budget to at least {_mb(smallest)} or add cheaper candidates",
            ) from None
        plan, rows = {}, []
        for g, c in enumerate(alloc.choice):
            fmt = table.candidates[c]
            for m in table.groups[g]:
                plan[m] = fmt
            rows.append({"group": table.group_names[g], "tensors": len(table.groups[g]), "format": fmt,
                         "score": table.scores[g][c], "bytes": int(table.bytes[g][c])})
        program.annotations[PLAN] = plan
        program.annotations["quant.allocation"] = rows
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["format"]] = counts.get(r["format"], 0) + 1
        predicted = overhead + alloc.bytes
        return PassResult(program, False, {
            "budget_bytes": budget, "predicted_bytes": predicted, "overhead_bytes": overhead,
            "objective": alloc.objective, "solver": alloc.status, "solver_seconds": alloc.seconds,
            "formats": counts, "table": rows,
        })
