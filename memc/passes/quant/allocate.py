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
        alloc, overhead, measured = self._solve(program, info, scores, nbytes, budget, overhead)
        plan, rows = self._plan(table, alloc)
        program.annotations[PLAN] = plan
        program.annotations["quant.allocation"] = rows
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["format"]] = counts.get(r["format"], 0) + 1
        predicted = overhead + alloc.bytes
        return PassResult(program, False, {
            "budget_bytes": budget, "predicted_bytes": predicted, "overhead_bytes": overhead,
            "overhead_measurements": measured,
            "objective": alloc.objective, "solver": alloc.status, "solver_seconds": alloc.seconds,
            "formats": counts, "table": rows,
        })

    # The graph's own bytes depend a little on the chosen formats (a kept float weight may be stored transposed next
    # to its embedding, fused attention changes which constants stay): the overhead measured at the cheapest
    # formats is a first guess. Each round lowers the chosen plan once (RTN codes: same shapes and bytes as GPTQ's),
    # re-solves with the plan's real overhead, and the best plan that truly fits is kept.
    ROUNDS = 4

    def _solve(self, program: Program, info: dict, scores, nbytes, budget: int, overhead: int):
        from memc.passes.quant.graph_bytes import measure_graph_bytes

        refine = self.config.overhead_bytes < 0 and info["graph_bytes"] is not None and "weights" in info
        best, measured = None, []
        for _ in range(self.ROUNDS if refine else 1):
            alloc = self._allocate(scores, nbytes, budget, overhead)
            if not refine:
                return alloc, overhead, measured
            real = measure_graph_bytes(program, info["weights"], self._plan(info["table"], alloc)[0], info["target"])
            measured.append(real)
            if real + alloc.bytes <= budget and (best is None or alloc.objective < best[0].objective):
                best = (alloc, real)
            if real == overhead:
                break
            overhead = real
        if best is None:
            raise InfeasibleBudget(
                f"allocate-bits.budget: {self.config.budget!r} ({budget:,} bytes) is infeasible: after {len(measured)} "
                f"measured lowerings no plan fits (graph and unquantized tensors measured at {measured} bytes)",
                hint="raise the budget a little or add cheaper candidates",
            )
        return best[0], best[1], measured

    def _allocate(self, scores, nbytes, budget: int, overhead: int):
        try:
            return allocate(scores, nbytes, budget - overhead, time_limit=self.config.time_limit)
        except InfeasibleBudget as exc:
            smallest = overhead + int(nbytes.min(1).sum())
            raise InfeasibleBudget(
                f"allocate-bits.budget: {self.config.budget!r} ({budget:,} bytes) is infeasible: the smallest artifact "
                f"these candidates can make is {smallest:,} bytes ({_mb(smallest)}: every group at its cheapest format "
                f"plus {overhead:,} bytes of graph and unquantized tensors) [{exc}]",
                hint=f"raise the budget to at least {_mb(smallest)} or add cheaper candidates",
            ) from None

    @staticmethod
    def _plan(table, alloc) -> tuple[dict[str, str], list[dict]]:
        plan, rows = {}, []
        for g, c in enumerate(alloc.choice):
            fmt = table.candidates[c]
            for m in table.groups[g]:
                plan[m] = fmt
            rows.append({"group": table.group_names[g], "tensors": len(table.groups[g]), "format": fmt,
                         "score": table.scores[g][c], "bytes": int(table.bytes[g][c])})
        return plan, rows
