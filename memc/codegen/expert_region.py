"""The experts region of one MoE site: the part of the graph an expert cache runs with its slot weights.

An expert cache cannot run a whole layer in one graph: which experts it needs is known only after the router, and
loading them is a host step. So each MoE site is cut into its *region* - every op from the routed rows to the point
where the k expert outputs of a token are combined - and the rest of the graph. The region is found on the graph
(no family knowledge), from the site's annotations (memc.passes.moe.detect):

* its output ``O``: the first node of the block that every path from the expert gathers (``W[ids]``) to the graph
  output passes through and that has one row per token (``[n, H]``, n = the router's rows);
* its inputs, walking back from ``O``: the top-k ids, the gathered expert tensors (which become slot buffers
  ``[slots, ...]``) and every tensor with one row per token that does not depend on the ids or the experts (the
  routed rows ``x``, the gate weights, DeepSeek's sigmoid scores ...). Sizes the region reads from the graph's
  inputs (``batch * seq``) are re-expressed as the row count of its own inputs, so the region runs on any subset of
  rows: that is what lets the host process tokens in groups whose experts fit in the slots.

``experts_module`` builds the region as its own GraphModule ``(rows..., ids, slots, *slot_weights) -> O`` where each
expert gather reads the slot buffers at ``slots`` (ids mapped to slots by the host) and any other use of the ids
keeps the true ids. A site this cannot cut (ModuleList experts, experts used without a gather by id, a region that
reads other state) is refused with its module path.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from memc.errors import UnsupportedError
from memc.passes.moe.graph import PASSTHROUGH, aten, get_attr_tensor, source_attr
from memc.passes.moe.sites import MoESite


@dataclass
class ExpertRegion:
    """One site's cut: node names refer to the graph it was found in."""

    site: MoESite
    output: fx.Node  # O [n, H]
    rows: list[fx.Node]  # external inputs with one row per token (the routed rows first when it is one of them)
    ids: fx.Node  # the top-k expert ids [n, k]
    params: list[str]  # expert tensors (get_attr targets), leading dim E, gathered by id
    nodes: list[fx.Node] = field(default_factory=list)  # the region's nodes in graph order

    @property
    def label(self) -> str:
        return _label(self.site)


def _expr(value: object) -> object:
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _rows_of(node: object) -> object | None:
    val = _val(node)
    return _expr(val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() >= 1 else None


def _descendants(starts: list[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _gathers(gm: fx.GraphModule, site: MoESite) -> dict[fx.Node, str]:
    """``aten.index.Tensor`` nodes reading an expert tensor -> that tensor's target."""
    params = set(site.expert_params)
    return {n: source_attr(n.args[0]) for n in gm.graph.nodes
            if n.op == "call_function" and n.target is aten.index.Tensor and source_attr(n.args[0]) in params}


def _post_dominates(candidate: fx.Node, starts: list[fx.Node], output: fx.Node) -> bool:
    """Every path from ``starts`` to the graph output passes through ``candidate``."""
    seen, stack = {candidate}, [s for s in starts if s is not candidate]
    while stack:
        n = stack.pop()
        if n is output:
            return False
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return True


def _label(site: MoESite) -> str:
    return f"MoE site {site.path or '(top level)'} (layer {site.layer})"


def check_form(site: MoESite) -> None:
    """Refuse a site whose experts are not fused tensors gathered by expert id."""
    if site.experts_form != "fused":
        raise UnsupportedError(
            f"expert_cache: {_label(site)} keeps its experts in a ModuleList and runs every expert on every token; the "
            "expert cache needs fused expert tensors gathered by expert id (transformers' batched_mm form)",
            hint="load the model with experts_implementation='batched_mm' (memc's capture does for transformers MoE), "
                 "or compile without target.expert_cache",
        )


def find_region(gm: fx.GraphModule, site: MoESite) -> ExpertRegion:
    """The experts region of ``site`` in ``gm`` (see the module docstring); refuses what it cannot cut."""
    label = _label(site)
    check_form(site)
    by_name = {n.name: n for n in gm.graph.nodes}
    ids, router = by_name.get(site.indices_node), by_name.get(site.router_node)
    gathers = _gathers(gm, site)
    if ids is None or router is None or not gathers:
        raise UnsupportedError(f"expert_cache: {label}: its top-k ids or expert gathers are not in the graph")
    n_rows = _rows_of(router)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    starts = list(gathers)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after = max(order[g] for g in starts)
    out = None
    for cand in sorted(_descendants(starts) - {output_node}, key=order.__getitem__):
        val = _val(cand)
        if order[cand] < after or not isinstance(val, torch.Tensor) or val.dim() != 2:
            continue
        if _expr(val.shape[0]) == n_rows and _post_dominates(cand, starts, output_node):
            out = cand
            break
    if out is None:
        raise UnsupportedError(f"expert_cache: {label}: no single [tokens, hidden] value combines the experts' "
                               "outputs, so the layer cannot be cut into a router part and an experts part")
    dependent = _descendants([ids]) | _descendants([n for n in gm.graph.nodes if n.op == "get_attr"
                                                    and str(n.target) in site.expert_params])
    region, rows, stack = set(), [], [out]
    while stack:
        n = stack.pop()
        if n in region or n is ids:
            continue
        region.add(n)
        for a in n.all_input_nodes:
            if a is ids or a in region:
                continue
            if a.op == "get_attr":
                continue
            val = _val(a)
            if isinstance(val, torch.SymInt) or isinstance(val, (int, float)):
                continue  # sizes: re-expressed from the region's inputs in experts_module
            if a not in dependent and _rows_of(a) is not None and _expr(_rows_of(a)) == n_rows:
                if a not in rows:
                    rows.append(a)
                continue
            if a.op == "placeholder":
                raise UnsupportedError(f"expert_cache: {label}: the experts part reads the graph input {a.name!r}, "
                                       "so it cannot run on a group of tokens")
            stack.append(a)
    x = router.args[0]
    while isinstance(x, fx.Node) and x not in rows and x.op == "call_function" and x.target in PASSTHROUGH:
        x = x.args[0]
    rows.sort(key=lambda r: (r is not x, order[r]))
    for n in region:
        for a in n.all_input_nodes:
            t = str(a.target) if a.op == "get_attr" else None
            if t in site.expert_params and not (n.target is aten.index.Tensor or n.target in PASSTHROUGH):
                raise UnsupportedError(f"expert_cache: {label}: expert tensor {t} is used by {n.name} ({n.target}) "
                                       "without a gather by expert id")
    return ExpertRegion(site, out, rows, ids, list(site.expert_params), sorted(region, key=order.__getitem__))


def _size_of(value: object, rows: list[fx.Node], graph: fx.Graph, placeholders: list[fx.Node], label: str) -> object:
    """A size the region read from outside, as an expression of its first row input's row count."""
    expr = _expr(value)
    if isinstance(expr, int) or (isinstance(expr, sympy.Integer)):
        return int(expr)
    n = _rows_of(rows[0])
    ratio = sympy.simplify(expr / n)
    if ratio.is_Integer:
        size = graph.call_function(aten.sym_size.int, (placeholders[0], 0))
        return size if int(ratio) == 1 else graph.call_function(operator.mul, (size, int(ratio)))
    raise UnsupportedError(f"expert_cache: {label}: the experts part uses the size {expr}, which is not a multiple "
                           f"of its token count {n}")


def experts_module(gm: fx.GraphModule, region: ExpertRegion) -> tuple[fx.GraphModule, list[str]]:
    """The region as ``(rows..., ids, slots, *slot_weights) -> O``; returns it and its input names."""
    label = region.label
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    names = [f"rows_{i}" for i in range(len(region.rows))] + ["ids", "slots"] + [
        f"slot_{p.rsplit('.', 1)[-1]}" for p in region.params]
    if len(set(names)) != len(names):
        names = names[:len(region.rows) + 2] + [f"slot_{i}" for i in range(len(region.params))]
    holders = [graph.placeholder(n) for n in names]
    rows_ph, ids_ph, slots_ph = holders[:len(region.rows)], holders[len(region.rows)], holders[len(region.rows) + 1]
    weights = dict(zip(region.params, holders[len(region.rows) + 2:]))
    env.update(zip(region.rows, rows_ph))
    env[region.ids] = ids_ph
    root = torch.nn.Module()
    in_region = set(region.nodes)

    def arg(a: object, slot_chain: bool = False) -> object:
        if not isinstance(a, fx.Node):
            return fx.node.map_arg(a, lambda x: arg(x, slot_chain))
        if slot_chain and a is region.ids:
            return slots_ph
        if slot_chain and a.op == "call_function" and a.target in PASSTHROUGH:
            return graph.call_function(a.target, fx.node.map_arg(a.args, lambda x: arg(x, True)),
                                       fx.node.map_arg(a.kwargs, lambda x: arg(x)))
        if a in env:
            return env[a]
        if a.op == "get_attr":
            target = str(a.target)
            if target in weights:
                env[a] = weights[target]
            else:
                name = target.replace(".", "_")
                root.register_buffer(name, get_attr_tensor(gm, target).detach().clone())
                env[a] = graph.get_attr(name)
            return env[a]
        val = _val(a)
        if a not in in_region and (isinstance(val, torch.SymInt) or isinstance(val, int)):
            env[a] = _size_of(val, region.rows, graph, rows_ph, label)
            return env[a]
        raise UnsupportedError(f"expert_cache: {label}: node {a.name} is outside the experts part")

    for node in region.nodes:
        if node.target is aten.index.Tensor and source_attr(node.args[0]) in weights:
            env[node] = graph.call_function(node.target, (arg(node.args[0]), arg(list(node.args[1]), True)))
        else:
            env[node] = graph.node_copy(node, lambda a: arg(a))
        env[node].meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")}
    graph.output(env[region.output])
    graph.eliminate_dead_code()
    if not ids_ph.users:  # every use of the ids was a gather: the slots replace them
        graph.erase_node(ids_ph)
    module = fx.GraphModule(root, graph)
    used = {n.name for n in graph.nodes if n.op == "placeholder" and n.users}
    if slots_ph.name not in used:
        raise UnsupportedError(f"expert_cache: {label}: the experts part does not gather the experts by slot")
    return module, [n.name for n in graph.nodes if n.op == "placeholder"]
