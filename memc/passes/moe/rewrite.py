"""Exact graph rewrites of one MoE layer: keep a subset of experts (slicing), or mask the others (the reference).

``keep_experts`` slices the router rows (+ bias, correction bias) and every fused expert tensor along the expert
axis, patches the shape constants that spell E (DeepSeek's [-1, G, E/G] group views), and for a ModuleList MoE
renumbers the ``idx == e`` tests and removes the dropped experts' terms from the sum. Top-k semantics are kept:
the router now scores only the kept experts, which is exactly the original model with the dropped experts'
choice scores at -inf (``mask_experts``): for softmax routers that is the logits, so the softmax denominator runs
over the kept experts in both (renormalised or not); for sigmoid routers it is the score + correction bias.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from memc.errors import PassError
from memc.passes.cleanup import _drop_unused_attributes
from memc.passes.moe.calibrate import probe, within
from memc.passes.moe.graph import aten, get_attr_tensor, set_attr_tensor
from memc.passes.moe.sites import MoESite

_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default}


def _downstream(start: Node, site: MoESite) -> set[Node]:
    """Nodes computed from ``start`` inside the MoE block (later layers depend on it too, and are not ours)."""
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        if n in seen or not within(n, site.path):
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


def _node(gm: GraphModule, name: str) -> Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise PassError(f"MoE rewrite: graph node {name!r} is gone (did an earlier pass rewrite this layer?)")


def _patch_shapes(gm: GraphModule, site: MoESite, new_e: int) -> None:
    """Shape constants equal to E (or E/G in a group view) in the router's downstream ops -> the kept counts."""
    router = _node(gm, site.router_node)
    E, G = site.num_experts, site.groups
    for n in _downstream(router, site):
        if n.op != "call_function":
            continue
        if n.target in _SHAPE_OPS and isinstance(n.args[1], (list, tuple)) and n.args[1]:
            shape = list(n.args[1])
            if G > 1 and len(shape) == 3 and shape[-2] == G and shape[-1] == E // G:
                shape[-1] = new_e // G
            elif shape[-1] == E:
                shape[-1] = new_e
            n.args = (n.args[0], shape, *n.args[2:])
        elif n.target is aten.one_hot.default and len(n.args) > 1 and n.args[1] == E:
            n.args = (n.args[0], new_e)


def _modulelist_tests(gm: GraphModule, site: MoESite) -> dict[int, list[Node]]:
    """expert id -> the ``idx == id`` nodes that pick its tokens."""
    found: dict[int, list[Node]] = {}
    for n in _downstream(_node(gm, site.indices_node), site):
        if n.target in (aten.eq.Scalar, aten.eq.Tensor) and isinstance(n.args[1], int):
            found.setdefault(n.args[1], []).append(n)
    return found


def keep_experts(gm: GraphModule, site: MoESite, kept: list[int]) -> int:
    """Rewrite ``site`` to its experts ``kept`` (sorted ids, new id = position); returns the bytes freed."""
    kept = sorted(kept)
    index = torch.tensor(kept, dtype=torch.long)
    before = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    routing = [site.router_weight, site.router_bias, site.correction_bias]
    for target in [t for t in routing if t]:
        set_attr_tensor(gm, target, get_attr_tensor(gm, target).index_select(0, index))
    if site.experts_form == "fused":
        for target in site.expert_params:
            set_attr_tensor(gm, target, get_attr_tensor(gm, target).index_select(0, index))
        _patch_shapes(gm, site, len(kept))
    else:
        tests = _modulelist_tests(gm, site)
        if sorted(tests) != list(range(site.num_experts)):
            raise PassError(f"prune-experts: {site.path} does not pick experts by 'idx == e' for every e")
        found = probe(gm, site)
        for e in range(site.num_experts):
            if e in kept:
                for n in tests[e]:
                    n.args = (n.args[0], kept.index(e))
                continue
            out = found.outputs[e]
            mul = next(u for u in out.users if u.target is aten.mul.Tensor)
            add = next((u for u in mul.users if u.target is aten.add.Tensor), None)
            if add is None:
                raise PassError(f"prune-experts: expert {site.expert_modules[e]}'s term is not added to the sum")
            add.replace_all_uses_with(add.args[0] if add.args[1] is mul else add.args[1])
            gm.graph.erase_node(add)
        _patch_shapes(gm, site, len(kept))
    gm.graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.recompile()
    after = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    return before - after


def mask_experts(gm: GraphModule, site: MoESite, kept: list[int], tag: str = "") -> None:
    """The reference: the unpruned layer with every dropped expert's choice score at -inf."""
    choice = _node(gm, site.choice_node)
    mask = torch.full((site.num_experts,), float("-inf"))
    mask[torch.tensor(sorted(kept))] = 0.0
    name = f"memc_moe_mask{tag}_{site.layer}"
    gm.register_buffer(name, mask)
    with gm.graph.inserting_after(choice):
        attr = gm.graph.get_attr(name)
    with gm.graph.inserting_after(attr):
        masked = gm.graph.call_function(aten.add.Tensor, (choice, attr))
    choice.replace_all_uses_with(masked, delete_user_cb=lambda u: u is not masked)
    gm.recompile()
