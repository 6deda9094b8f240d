"""detect-moe: find every Mixture-of-Experts layer in the exported graph (provides ``sites.moe``).

Seeded at each ``aten.topk`` over a full expert axis (DeepSeek's group-score top-k is over E/G or G and is not a
seed): walk back through the score function (softmax / sigmoid / correction-bias add / group mask / casts) to the
``aten.linear`` whose weight is [E, H] - the router. The experts are the tensors the top-k indices gather from
(fused 3-D tensors, transformers' batched_mm form) or, failing that, a ModuleList of E modules beside the router
(hand-written MoE with a loop over experts). Works on the graph alone: module paths come from get_attr targets and
``nn_module_stack``, so any architecture written this way is found, not only the families memc was tested on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch.fx import GraphModule, Node

from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.moe.graph import (
    PASSTHROUGH, aten, derives_from, forward_through, get_attr_tensor, getitem_user, shape_of, source_attr,
)
from memc.passes.moe.sites import MoESite
from memc.program import Program, module_path

SITES_KEY = "sites.moe"

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_WALK = PASSTHROUGH | _SOFTMAX | {
    aten.sigmoid.default, aten.add.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
}


@dataclass
class _Router:
    linear: Node
    chain: list[Node]  # from the top-k input back to (excluding) the linear
    weight: str
    num_experts: int


def _walk_to_router(gm: GraphModule, topk: Node) -> _Router | None:
    inp = topk.args[0]
    in_shape = shape_of(inp)
    if not in_shape:
        return None
    chain: list[Node] = []
    cur = inp
    for _ in range(16):
        if not isinstance(cur, Node) or cur.op != "call_function":
            return None
        if cur.target is aten.linear.default:
            break
        if cur.target not in _WALK:
            return None
        chain.append(cur)
        if cur.target is aten.add.Tensor:  # score + correction bias: follow the non-attribute operand
            tensors = [a for a in cur.args if isinstance(a, Node)]
            flowing = [a for a in tensors if source_attr(a) is None]
            if len(flowing) != 1:
                return None
            cur = flowing[0]
        else:
            cur = cur.args[0]
    else:
        return None
    weight = source_attr(cur.args[1]) if len(cur.args) > 1 else None
    if weight is None:
        return None
    w = get_attr_tensor(gm, weight)
    out_shape = shape_of(cur)
    if w.dim() != 2 or not out_shape or out_shape[-1] != in_shape[-1]:
        return None  # a top-k over part of the expert axis (group scores) or not over a linear's features
    return _Router(cur, chain, weight, int(w.shape[0]))


def _gate_values(topk: Node, indices: Node, score: str, chain: list[Node]) -> Node | None:
    """The node holding the k selected experts' gate scores before renormalisation / scaling."""
    if score == "sigmoid":
        sig = next(n for n in chain if n.target is aten.sigmoid.default)
        for user in sig.users:
            if user.target is aten.gather.default and derives_from(user.args[2], indices):
                return user
        return None
    return getitem_user(topk, 0)


def _renorm_and_scale(values: Node) -> tuple[bool, float]:
    renorm, scale = False, 1.0
    frontier = list(forward_through(values))
    for _ in range(4):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.target in (aten.sum.dim_IntList, aten.sum.default):
                    renorm = True
                if u.target in (aten.div.Tensor, aten.div_.Tensor) and u.args[0] is n:
                    nxt.append(u)
                if u.target is aten.mul.Tensor and isinstance(u.args[1], float):
                    scale *= u.args[1]
                    nxt.append(u)
                if u.target in PASSTHROUGH:
                    nxt.append(u)
        frontier = nxt
    return renorm, scale


def _groups(gm: GraphModule, topk: Node, choice: Node) -> tuple[int, int]:
    """DeepSeek-style grouping: a top-k over view(choice, [-1, G, E/G]) and a top-k over the G group scores."""
    groups, keep = 1, 1
    here = module_path(topk)
    for n in gm.graph.nodes:
        if n is topk or n.target is not aten.topk.default or module_path(n) != here:
            continue
        shape = shape_of(n.args[0])
        if shape and len(shape) == 3 and derives_from(n.args[0], choice):
            groups = int(shape[-2])
        elif shape and len(shape) == 2:
            keep = int(n.args[1])
    return (groups, keep) if groups > 1 else (1, 1)


def _fused_experts(gm: GraphModule, indices: Node, num_experts: int) -> list[str]:
    """Attributes gathered by expert id (``w[expert_ids]``) with leading dim E."""
    found: list[str] = []
    for n in gm.graph.nodes:
        if n.target is not aten.index.Tensor:
            continue
        idx = [i for i in n.args[1] if isinstance(i, Node)]
        if len(idx) == 1 and derives_from(idx[0], indices):
            target = source_attr(n.args[0])
            if target and get_attr_tensor(gm, target).shape[0] == num_experts and target not in found:
                found.append(target)
    return found


def _modulelist_experts(targets: list[str], block: str, num_experts: int) -> tuple[list[str], list[str]]:
    """A ModuleList ``<block>.<name>.<i>`` with E members: (module paths in id order, their attributes). After
    pruning the members keep their original names (experts.0, experts.2, ...), in the order of the new ids."""
    pattern = re.compile(re.escape(block) + r"\.([A-Za-z_]\w*)\.(\d+)\.")
    members: dict[str, dict[int, list[str]]] = {}
    for t in targets:
        m = pattern.match(t)
        if m:
            members.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(t)
    for name, by_id in members.items():
        if len(by_id) == num_experts:
            return [f"{block}.{name}.{i}" for i in sorted(by_id)], [t for i in sorted(by_id) for t in by_id[i]]
    return [], []


def _bytes(gm: GraphModule, targets: list[str]) -> int:
    return sum(get_attr_tensor(gm, t).numel() * get_attr_tensor(gm, t).element_size() for t in targets)


def find_moe_sites(gm: GraphModule) -> list[MoESite]:
    """Every MoE layer of ``gm``, in graph order."""
    attrs = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "get_attr"))
    sites: list[MoESite] = []
    for topk in [n for n in gm.graph.nodes if n.target is aten.topk.default]:
        router = _walk_to_router(gm, topk)
        indices = getitem_user(topk, 1)
        if router is None or indices is None:
            continue
        kinds = {n.target for n in router.chain}
        if kinds & _SOFTMAX:
            score = "softmax-topk"
        elif aten.sigmoid.default in kinds:
            score = "sigmoid"
        else:
            values = getitem_user(topk, 0)
            after = [u for n in (forward_through(values) if values is not None else []) for u in n.users]
            if not any(u.target in _SOFTMAX for u in after):
                continue  # a top-k of raw scores that are never turned into gate weights: not a router
            score = "topk-softmax"
        choice, correction = router.linear, None
        if score == "sigmoid":
            i = next(i for i, n in enumerate(router.chain) if n.target is aten.sigmoid.default)
            choice = router.chain[i]
            if i > 0 and router.chain[i - 1].target is aten.add.Tensor:
                choice = router.chain[i - 1]
                correction = next((source_attr(a) for a in choice.args if source_attr(a)), None)
        if score == "topk-softmax":
            renorm, scale = True, 1.0
        else:
            values = _gate_values(topk, indices, score, router.chain)
            renorm, scale = _renorm_and_scale(values) if values is not None else (False, 1.0)
        groups, topk_groups = _groups(gm, topk, choice) if score == "sigmoid" else (1, 1)
        E = router.num_experts
        router_path = router.weight.rpartition(".")[0]
        block = router_path.rpartition(".")[0] if router_path else ""
        bias = source_attr(router.linear.args[2]) if len(router.linear.args) > 2 else None
        fused = _fused_experts(gm, indices, E)
        modules: list[str] = []
        if fused:
            form, experts = "fused", fused
        else:
            modules, experts = _modulelist_experts(attrs, block, E)
            form = "modulelist"
            if not experts:
                block = router_path  # the router weight may belong to the block itself
                modules, experts = _modulelist_experts(attrs, block, E)
            if not experts:
                continue
        routing = {router.weight, bias, correction}
        prefix = f"{block}." if block else ""
        shared = list(dict.fromkeys(
            t.rpartition(".")[0] for t in attrs
            if t.startswith(prefix) and t not in routing and t not in experts and t.rpartition(".")[0] != router_path
        ))
        sites.append(MoESite(
            path=block, layer=len(sites), router_path=router_path, router_weight=router.weight, router_bias=bias,
            correction_bias=correction, num_experts=E, top_k=int(topk.args[1]),
            hidden_size=int(get_attr_tensor(gm, router.weight).shape[1]), score=score, renormalize=renorm,
            scaling=float(scale), groups=groups, topk_groups=topk_groups, experts_form=form, expert_params=experts,
            expert_modules=modules, shared_modules=shared, expert_bytes=_bytes(gm, experts),
            router_node=router.linear.name, choice_node=choice.name, topk_node=topk.name, indices_node=indices.name,
        ))
    return sites


@register_pass
class DetectMoE(Pass):
    """Find every MoE layer (router, score function, k, experts, shared experts) and publish them as sites.moe."""

    name = "detect-moe"
    provides = frozenset({SITES_KEY})

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        sites = find_moe_sites(program.module)
        program.annotations[SITES_KEY] = sites
        return PassResult(program, False, {
            "moe_layers": len(sites), "experts": [s.num_experts for s in sites],
            "expert_bytes": sum(s.expert_bytes for s in sites),
        })
