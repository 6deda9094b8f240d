"""Cut one ONNX graph into consecutive segments at values the host computes itself.

An expert cache runs a model as ``segment 0 -> host -> segment 1 -> host -> ...``: at each cut ``i`` the host
reads some values (``needs[i]``: the router's ids, the routed rows, the gates) and supplies one (``cut_values[i]``,
the experts' combined output) from a graph of its own. Every node gets a *stage*: the number of cut values it
depends on; segment ``s`` computes the stage-``s`` nodes that its outputs need. A value one segment computes and a
later one reads crosses between them (an output of the first, an input of the second); values that depend on no
stage (constants, shapes of the graph inputs, the position ids) are recomputed by each segment that needs them,
and graph inputs are fed to every segment that reads them. Nodes only the cut values depend on (the experts part)
are in no segment.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper


@dataclass
class Segment:
    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {v.name: v.type for v in [*g.value_info, *g.input, *g.output]}
    for init in g.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


def split_segments(model: onnx.ModelProto, needs: list[list[str]], cut_values: list[str]) -> list[Segment]:
    """``len(cut_values) + 1`` segments; segment ``s < L`` outputs ``needs[s]`` (those it computes), the last one
    the graph's outputs that are neither ``needs`` nor ``cut_values``. Every segment also outputs what later ones
    read from it."""
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"cannot split a graph with control flow (node {node.name}, {node.op_type})")
    graph_inputs = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer}
    producer: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for o in node.output:
            producer[o] = i
    cut_stage = {v: i + 1 for i, v in enumerate(cut_values)}
    # None: free (constants: recomputed by every segment that needs them); the graph inputs are stage 0
    stage: dict[str, int | None] = {**{n: None for n in inits}, **{n: 0 for n in graph_inputs}}
    for node in g.node:
        found = [stage.get(x) for x in node.input if x]
        s = max((x for x in found if x is not None), default=None)
        for o in node.output:
            stage[o] = cut_stage.get(o, s)
    boundary = {v for vs in needs for v in vs} | set(cut_values)
    finals = [o.name for o in g.output if o.name not in boundary]
    last = len(cut_values)
    wanted: list[list[str]] = [[] for _ in range(last + 1)]
    for s, vs in enumerate(needs):
        for v in vs:
            at = stage.get(v)
            if at is not None and at > s:
                raise ValueError(f"{v} is needed at cut {s} but depends on a later cut")
            wanted[at or 0].append(v)
    for v in finals:
        wanted[stage[v] if stage.get(v) is not None else last].append(v)
    types = _types(model)
    segments: list[Segment | None] = [None] * (last + 1)
    for s in range(last, -1, -1):
        nodes: set[int] = set()
        inputs: list[str] = []
        used_inits: list[str] = []
        stack = list(dict.fromkeys(wanted[s]))
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if v in seen or not v:
                continue
            seen.add(v)
            at = stage.get(v)
            if v in graph_inputs or (v in cut_stage and cut_stage[v] == s) or (at is not None and at < s):
                inputs.append(v)
                if at is not None and at < s and v not in graph_inputs and v not in cut_stage:
                    wanted[at].append(v)
                continue
            if v in cut_stage:
                raise ValueError(f"segment {s} needs the cut value {v} of a later cut")
            if v in inits:
                used_inits.append(v)
                continue
            if v not in producer:
                raise ValueError(f"value {v} has no producer")
            i = producer[v]
            if i not in nodes:
                nodes.add(i)
                stack.extend(g.node[i].input)
        outs = list(dict.fromkeys(wanted[s]))
        order = sorted(nodes)
        inputs = sorted(set(inputs), key=lambda n: (n not in graph_inputs, n))
        graph = helper.make_graph(
            [g.node[i] for i in order], f"{g.name or 'graph'}_segment{s}",
            [helper.make_value_info(n, types[n]) for n in inputs],
            [helper.make_value_info(n, types[n]) for n in outs],
            [inits[n] for n in sorted(set(used_inits))],
        )
        seg = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                producer_name=model.producer_name)
        seg.functions.extend(model.functions)
        segments[s] = Segment(seg, inputs, outs)
    return [s for s in segments if s is not None]
