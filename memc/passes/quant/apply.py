"""Rewrite a program so quantized tensors are read through memc.nn's QuantLinear / QuantEmbedding."""
from __future__ import annotations

import torch

from memc.nn.quant_linear import QuantEmbedding, QuantizedWeight, QuantLinear
from memc.program import Program
from memc.quant.rtn import QuantTensor
from memc.quant.sites import WeightTensor
from memc.quant.speed import level_for

QUANT_ATTR = "quant"  # the new module lives at <original module path>.quant


def _install(gm: torch.fx.GraphModule, path: str, module: torch.nn.Module) -> str:
    base = f"{path}.{QUANT_ATTR}" if path else f"memc_{QUANT_ATTR}"
    target, i = base, 1
    while True:
        try:
            gm.get_submodule(target)
        except AttributeError:
            break
        i += 1
        target = f"{base}{i}"
    gm.add_submodule(target, module)
    return target


def apply_quantization(
    program: Program, weights: list[WeightTensor], quantized: dict[str, QuantTensor], accuracy_level: int = 0
) -> int:
    """Replace every use of each tensor in ``quantized``; returns the stored bytes of the quantized tensors.
    ``accuracy_level`` -1 picks the MatMulNBits level measured fastest for each tensor's format (memc.quant.speed)."""
    gm = program.module
    nodes = {n.name: n for n in gm.graph.nodes}
    total = 0
    for w in weights:
        q = quantized.get(w.name)
        if q is None:
            continue
        qw = QuantizedWeight(q, w.name)
        total += qw.nbytes()
        for use in w.uses:
            node = nodes[use.node]
            if use.kind == "linear":
                x, _w, *rest = node.args
                target = _install(gm, use.module, QuantLinear(qw, accuracy_level=level_for(q.fmt, accuracy_level)))
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(target, (x,))
                    new.meta = dict(node.meta)
                    if rest and rest[0] is not None:
                        new = gm.graph.call_function(torch.ops.aten.add.Tensor, (new, rest[0]))
                        new.meta = dict(node.meta)
            else:
                ids = node.args[1]
                target = _install(gm, use.module, QuantEmbedding(qw))
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(target, (ids,))
                    new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for w in weights:
        if w.name in quantized:
            for target in w.targets:
                owner, _, attr = target.rpartition(".")
                if target not in still_read:
                    delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.recompile()
    return total


def quantized_modules(program: Program) -> dict[str, QuantizedWeight]:
    """Every QuantizedWeight in the program (a tied one once), by the path it is first reached at."""
    out: dict[str, QuantizedWeight] = {}
    seen: set[int] = set()
    for name, m in program.module.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedWeight) and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out
