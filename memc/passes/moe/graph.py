"""Small fx helpers the MoE passes share: walking through casts and views, reading attributes by name."""
from __future__ import annotations

import operator
from typing import Iterator

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# ops that only move, cast or reshape a tensor (walked through when looking for where a value comes from)
PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.view.default, aten.reshape.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten.type_as.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints,
}


def get_attr_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_tensor(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a parameter / buffer in place of its owner (keeps parameter-ness and buffer persistence)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, name)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, name, torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    elif name in getattr(owner, "_buffers", {}):
        owner._buffers[name] = value.detach().clone()
    else:
        setattr(owner, name, value.detach().clone())


def source_attr(node: object) -> str | None:
    """The get_attr target a value is a cast / view of, or None."""
    while isinstance(node, Node):
        if node.op == "get_attr":
            return str(node.target)
        if node.op == "call_function" and node.target in PASSTHROUGH:
            node = node.args[0]
            continue
        return None
    return None


def derives_from(node: object, origin: Node, limit: int = 8) -> bool:
    """``node`` is ``origin`` seen through at most ``limit`` passthrough ops."""
    for _ in range(limit + 1):
        if node is origin:
            return True
        if not (isinstance(node, Node) and node.op == "call_function" and node.target in PASSTHROUGH):
            return False
        node = node.args[0]
    return False


def getitem_user(node: Node, index: int) -> Node | None:
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def forward_through(node: Node, limit: int = 6) -> Iterator[Node]:
    """``node`` and the users reachable from it through passthrough ops (breadth first)."""
    frontier, seen = [node], set()
    for _ in range(limit):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            yield n
            nxt.extend(u for u in n.users if u.op == "call_function" and u.target in PASSTHROUGH)
        frontier = nxt


def shape_of(node: object) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
