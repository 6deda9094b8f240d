"""PassManager: checks the pipeline's contract up front, runs passes with instruments, records what each did."""
from __future__ import annotations

import time
from typing import Sequence

from memc.errors import MemcError, PassError
from memc.passes.base import Pass, PassContext
from memc.passes.instruments import Instrument
from memc.program import PassRecord, Program
from memc.schema import to_dict


def check_order(passes: Sequence[Pass], available: set[str]) -> None:
    """Fail before running anything when a pass requires an annotation no earlier pass provides."""
    have = set(available)
    for i, p in enumerate(passes):
        missing = sorted(p.requires - have)
        if missing:
            providers = sorted(
                {q.name for q in _all_pass_classes() if set(missing) & q.provides}
            )
            hint = f"add {', '.join(repr(n) for n in providers)} before it" if providers else "no registered pass provides it"
            raise PassError(
                f"pipeline[{i}] ({p.name!r}) requires {', '.join(repr(m) for m in missing)}, "
                f"which no earlier pass provides: {hint}"
            )
        have -= p.invalidates
        have |= p.provides


def _all_pass_classes() -> list[type[Pass]]:
    from memc.passes.base import registered_passes

    return list(registered_passes().values())


class PassManager:
    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)

    def run(self, program: Program, ctx: PassContext) -> Program:
        check_order(self.passes, set(program.annotations))
        for i, p in enumerate(self.passes):
            ran = [q.name for q in self.passes[:i]]
            metrics: dict = {}
            start = time.perf_counter()
            try:
                for inst in self.instruments:
                    inst.before_pass(program, p)
                result = p.run(program, ctx)
                program = result.program
                for key in p.invalidates - p.provides:
                    program.annotations.pop(key, None)
                program.module.graph.lint()
                program.module.recompile()
                metrics.update(result.metrics)
                for inst in self.instruments:
                    inst.after_pass(program, p, metrics)
            except MemcError as exc:
                exc.args = (f"{exc.args[0]} (passes completed before it: {', '.join(ran) or 'none'})",)
                raise
            except Exception as exc:
                raise PassError(
                    f"pass {p.name!r} (pipeline[{i}]) failed: {type(exc).__name__}: {exc} "
                    f"(passes completed before it: {', '.join(ran) or 'none'})"
                ) from exc
            missing = sorted(k for k in p.provides if k not in program.annotations)
            if missing:
                raise PassError(f"pass {p.name!r} declares it provides {missing} but did not set them")
            program.log.append(
                PassRecord(p.name, to_dict(p.config), time.perf_counter() - start, result.changed, metrics)
            )
        return program
