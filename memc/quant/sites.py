"""Which weight tensors a program can quantize, how they are used, and which must share one format.

A weight tensor is one stored tensor (an embedding tied to the LM head is one tensor read by an ``aten.embedding``
and an ``aten.linear``). It is quantizable when it is 2-D floating point and every read of it is the weight of a
linear or an embedding. Linears that read the same input activation (q/k/v; gate/up) are tied so they share one
format, as the deployed fused kernels expect and as modelopt's auto_quantize does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from memc.program import Program, module_path

LINEAR = torch.ops.aten.linear.default
EMBEDDING = torch.ops.aten.embedding.default


@dataclass
class WeightUse:
    node: str
    kind: str  # "linear" | "embedding"
    module: str  # owning module path (nn_module_stack)
    input: str  # linear: the activation node; embedding: the ids node


@dataclass
class WeightTensor:
    name: str  # the parameter's name (the first name of a tied tensor)
    targets: list[str]  # get_attr targets that read it
    shape: tuple[int, ...]
    dtype: str
    uses: list[WeightUse] = field(default_factory=list)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class TieGroup:
    """Tensors that get one format together."""

    name: str
    members: list[str]


def _resolve(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def find_weights(program: Program) -> tuple[list[WeightTensor], int]:
    """Quantizable weight tensors in graph order, and the bytes of every other parameter / buffer (fixed)."""
    gm = program.module
    names: dict[int, str] = {}
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        names.setdefault(id(t), name)
    by_id: dict[int, WeightTensor] = {}
    bad: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = _resolve(gm, node.target)
        if not isinstance(t, torch.Tensor):
            continue
        key = id(t)
        w = by_id.setdefault(key, WeightTensor(
            names.get(key, node.target), [], tuple(t.shape), str(t.dtype).replace("torch.", "")))
        w.targets.append(node.target)
        for user in node.users:
            if user.op == "call_function" and user.target is LINEAR and user.args[1] is node and user.args[0] is not node:
                w.uses.append(WeightUse(user.name, "linear", module_path(user), user.args[0].name))
            elif user.op == "call_function" and user.target is EMBEDDING and user.args[0] is node:
                w.uses.append(WeightUse(user.name, "embedding", module_path(user), user.args[1].name))
            else:
                bad.add(key)
        if t.dim() != 2 or not t.is_floating_point():
            bad.add(key)
    weights = [w for k, w in by_id.items() if k not in bad and w.uses]
    seen: set[int] = set()
    fixed = 0
    keep_ids = {k for k, w in by_id.items() if k not in bad and w.uses}
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) in seen or id(t) in keep_ids:
            continue
        seen.add(id(t))
        fixed += t.numel() * t.element_size()
    return weights, fixed


def tie_groups(weights: list[WeightTensor]) -> list[TieGroup]:
    """Union of tensors whose linears read the same activation; groups in graph order of their first member."""
    parent = {w.name: w.name for w in weights}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_input: dict[str, str] = {}
    for w in weights:
        for u in w.uses:
            if u.kind != "linear":
                continue
            other = by_input.setdefault(u.input, w.name)
            parent[find(w.name)] = find(other)
    groups: dict[str, list[str]] = {}
    for w in weights:
        groups.setdefault(find(w.name), []).append(w.name)
    return [TieGroup(_group_name(members), members) for members in groups.values()]


def _group_name(members: list[str]) -> str:
    if len(members) == 1:
        return members[0]
    parts = [m.rsplit(".", 2) for m in members]
    prefix = parts[0][0] if all(len(p) == 3 and p[0] == parts[0][0] for p in parts) else ""
    leaves = "+".join(re.sub(r"_proj$", "", p[-2]) if len(p) == 3 else m for p, m in zip(parts, members))
    return f"{prefix}.{{{leaves}}}" if prefix else "{" + ",".join(members) + "}"


def block_of(name: str) -> int | None:
    """The decoder block index of a tensor name (``model.layers.3.mlp...`` -> 3), for GPTQ's block order."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None
