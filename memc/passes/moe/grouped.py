"""A faster form of fused (``batched_mm``) experts for the passes that run the graph many times in torch.

transformers' ``batched_mm`` experts gather one weight matrix per routed token (``W[ids]``: [N, O, H]) and run a
batched mat-vec: exportable, but memory bound (on ref-moe 90% of a forward) and slower still backwards. Calibration
and router / expert re-fitting only need the same values, so they run a copy of the graph in which each
``bmm(index(W, [ids]), x.unsqueeze(-1))`` (or the transposed ``bmm(x.unsqueeze(1), index(W, [ids]))``) becomes
one matmul per expert over the rows routed to it. Same arithmetic per row, autograd-able, never exported: the
Program keeps the exported form.
"""
from __future__ import annotations

import copy

import torch
from torch.fx import GraphModule, Node

from memc.passes.moe.graph import aten


def grouped_matvec(weight: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Row i: ``weight[ids[i]] @ x[i]`` ([E, O, H], [N], [N, H] -> [N, O]); ``transposed``: ``x[i] @ weight[ids[i]]``
    ([E, H, O]). One matmul per expert over the rows routed to it."""
    ids = ids.long()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=weight.shape[0]).tolist()
    rows = x.index_select(0, order)
    parts, start = [], 0
    for e, n in enumerate(counts):
        if n:
            w = weight[e]
            parts.append(rows[start : start + n] @ (w if transposed else w.transpose(0, 1)))
            start += n
    out_dim = weight.shape[2] if transposed else weight.shape[1]
    if not parts:
        return x.new_zeros(x.shape[0], out_dim)
    grouped = torch.cat(parts)
    return torch.zeros(x.shape[0], out_dim, dtype=grouped.dtype, device=x.device).index_copy(0, order, grouped)


def _gathered(node: object) -> tuple[Node, Node] | None:
    """(weight get_attr, ids) when ``node`` is ``aten.index.Tensor(W, [ids])`` of a 3-D attribute."""
    if not (isinstance(node, Node) and node.target is aten.index.Tensor):
        return None
    weight, indices = node.args[0], node.args[1]
    if not (isinstance(weight, Node) and weight.op == "get_attr" and len(indices) == 1 and indices[0] is not None):
        return None
    val = weight.meta.get("val")
    if val is not None and getattr(val, "dim", lambda: 3)() != 3:
        return None
    return weight, indices[0]


def _unsqueezed(node: object, dim: int) -> Node | None:
    if isinstance(node, Node) and node.target is aten.unsqueeze.default and node.args[1] in (dim, dim % 3):
        return node.args[0]
    return None


def grouped_form(gm: GraphModule) -> tuple[GraphModule, int]:
    """A copy of ``gm`` (sharing its parameters) with every gathered-weight bmm replaced; returns it and the count."""
    out = GraphModule(gm, copy.deepcopy(gm.graph))  # deepcopy keeps the output node and the pytree codegen
    replaced = 0
    for node in list(out.graph.nodes):
        if node.target is not aten.bmm.default:
            continue
        a, b = node.args[0], node.args[1]
        if (g := _gathered(a)) is not None and (x := _unsqueezed(b, -1)) is not None:
            transposed = False
        elif (g := _gathered(b)) is not None and (x := _unsqueezed(a, 1)) is not None:
            transposed = True
        else:
            continue
        weight, ids = g
        with out.graph.inserting_before(node):
            flat = out.graph.call_function(grouped_matvec, (weight, ids, x, transposed))
            shaped = out.graph.call_function(aten.unsqueeze.default, (flat, 1 if transposed else -1))
        node.replace_all_uses_with(shaped)
        out.graph.erase_node(node)
        replaced += 1
    out.graph.eliminate_dead_code()
    out.recompile()
    return out, replaced
