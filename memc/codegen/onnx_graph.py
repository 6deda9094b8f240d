"""Small ONNX graph-walking helpers shared by memc's graph rewrites (memc.codegen.fusion, memc.codegen.decode_fusion):
an index of producers / users / initializers, attribute and constant lookups, fresh names, dead-node and
unused-initializer clean-up.
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

MSFT = "com.microsoft"
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def subgraph_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The nodes of ``node``'s subgraph attributes (If / Loop / Scan bodies), which may read outer values."""
    return [sub for a in node.attribute
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)) for sub in g.node]


class GraphIndex:
    """Producers, users and initializers of a graph (rebuilt after each change; graphs here are small)."""

    def __init__(self, graph: onnx.GraphProto):
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                if i:
                    self.users.setdefault(i, []).append(n)
        for n in graph.node:  # subgraphs read outer values too: count those as users
            for sub in subgraph_nodes(n):
                for i in sub.input:
                    self.users.setdefault(i, []).append(n)

    def weight(self, name: str) -> onnx.TensorProto | None:
        """A 2-D float initializer used only once (by the node asking)."""
        t = self.inits.get(name)
        if t is None or len(t.dims) != 2 or t.data_type not in FLOATS or len(self.users.get(name, [])) != 1 \
                or name in self.outputs:
            return None
        return t

    def rename_uses(self, old: str, new: str) -> None:
        for n in self.users.get(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def is_std(node: onnx.NodeProto | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def const_value(idx: GraphIndex, name: str):
    if name in idx.inits:
        return numpy_helper.to_array(idx.inits[name])
    node = idx.producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Nodes none of whose outputs is read (the Cos / Sin the packed rule left without users)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for n in graph.node:
            used |= {i for sub in subgraph_nodes(n) for i in sub.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        used |= {i for sub in subgraph_nodes(n) for i in sub.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
