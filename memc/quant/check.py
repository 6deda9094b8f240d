"""Target-side check of a quantized program: every stored format must be one the target can hold."""
from __future__ import annotations

from memc.program import Program
from memc.quant.formats import check_target


def check_quant_formats(program: Program, target: str) -> None:
    """Raise UnsupportedError naming the first tensor whose format ``target`` cannot store (before any writing)."""
    from memc.nn.quant_linear import QuantizedWeight

    seen: set[int] = set()
    for name, m in program.module.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedWeight) and id(m) not in seen:
            seen.add(id(m))
            check_target(m.fmt, target, m.tensor_name or name)
