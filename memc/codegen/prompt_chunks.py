"""Causal prompt attention in chunks: one GroupQueryAttention over a long sequence becomes ``CHUNKS`` of them.

onnxruntime's CPU GroupQueryAttention computes a prompt's whole [S, S] score matrix per head and then zeroes its
upper half. Split into n chunks of queries, chunk j attends to the keys of chunks 0..j through GroupQueryAttention's
own past inputs (the presents of chunk j - 1), so about half of the wasted work is skipped: the scores computed
fall from S² to S²(n + 1) / 2n. The math of every row is unchanged (the same keys, the same softmax; the logits of
ref-llama are bit-identical). ref-llama, one thread, AVX-512 Xeon, model.onnx prefill tokens/s at 512 / 1024:
12,546 / 10,497 in one call, 13,671 / 11,854 in 4 chunks, 13,731 / 11,941 in 6, 13,943 / 12,176 in 8.

A chunk must hold at least one token (GroupQueryAttention refuses empty sequences), and chunks only pay for
themselves on long prompts, so an ``If`` keeps the single call below ``MIN_LENGTH`` tokens (and for batches of more
than one row, which GroupQueryAttention takes with a past only token by token). Applies to
GroupQueryAttention nodes without a past (model.onnx's prompt attention); a decode graph's attention has a past
and its engine chunks prompts itself (memc.runtime.engine).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from memc.codegen.onnx_graph import MSFT

CHUNKS = 8
MIN_LENGTH = 256


def _fresh(base: str, taken: set) -> str:
    """A name not in ``taken`` (then taken): every value, node and graph name this rewrite makes."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _is_prompt_gqa(node: onnx.NodeProto) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == MSFT and not any(node.input[3:5]) \
        and len(node.input) >= 7 and bool(node.input[5]) and bool(node.input[6])


def _bounds(graph: onnx.GraphProto, ref: str, seqlens: str, chunks: int, min_length: int, taken: set) -> dict:
    """Nodes computing, from the sequence length S (axis 1 of ``ref``): chunk ends b_j = j * S // chunks as
    int64 [1] (Slice bounds), total_j (int32 scalar) and seqlens_j = b_j - 1 broadcast like ``seqlens``, and the
    condition S >= min_length and batch 1 (GroupQueryAttention takes a past with several new tokens only for one
    row); appended to ``graph`` (once per graph). Returns the value names."""
    def name(base: str) -> str:
        return _fresh(base, taken)

    const = {}
    for label, value in [("axes", [1]), ("n", [chunks]), ("one", [1]), ("min", min_length)]:
        const[label] = name(f"prompt_chunks_{label}")
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), const[label]))
    s, batch, long, single, both, cond = (name(f"prompt_chunks_{x}") for x in ("len", "batch", "long", "single",
                                                                               "both", "cond"))
    nodes = [helper.make_node("Shape", [ref], [s], start=1, end=2),
             helper.make_node("Shape", [seqlens], [batch]),
             helper.make_node("GreaterOrEqual", [s, const["min"]], [long]),
             helper.make_node("Equal", [batch, const["one"]], [single]),  # past + several tokens: batch 1 only
             helper.make_node("And", [long, single], [both]),
             helper.make_node("Squeeze", [both], [cond])]
    ends, totals, lens = [const_zero := name("prompt_chunks_b0")], [], []
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), const_zero))
    for j in range(1, chunks + 1):
        j_const, scaled, end = name(f"prompt_chunks_j{j}"), name("prompt_chunks_js"), name(f"prompt_chunks_b{j}")
        graph.initializer.append(numpy_helper.from_array(np.array([j], np.int64), j_const))
        end32, total, last, last32, lens_j = (name(f"prompt_chunks_{x}{j}") for x in ("b32_", "total", "last",
                                                                                        "last32_", "seqlens"))
        nodes += [helper.make_node("Mul", [s, j_const], [scaled]),
                  helper.make_node("Div", [scaled, const["n"]], [end]),
                  helper.make_node("Cast", [end], [end32], to=TensorProto.INT32),
                  helper.make_node("Squeeze", [end32], [total]),
                  helper.make_node("Sub", [end, const["one"]], [last]),
                  helper.make_node("Cast", [last], [last32], to=TensorProto.INT32),
                  helper.make_node("Expand", [last32, batch], [lens_j])]
        ends.append(end)
        totals.append(total)
        lens.append(lens_j)
    return {"nodes": nodes, "axes": const["axes"], "ends": ends, "totals": totals, "seqlens": lens, "cond": cond}


def _chunked_branch(node: onnx.NodeProto, b: dict, chunks: int, taken: set) -> onnx.GraphProto:
    def name(base: str) -> str:
        return _fresh(base, taken)

    nodes, ys, past = [], [], ["", ""]
    qkv = list(node.input[:3])
    for j in range(chunks):
        parts = []
        for x in qkv:
            if not x:
                parts.append("")
                continue
            part = name(f"{x}_chunk{j}")
            nodes.append(helper.make_node("Slice", [x, b["ends"][j], b["ends"][j + 1], b["axes"]], [part]))
            parts.append(part)
        y, k, v = name(f"{node.output[0]}_chunk{j}"), name(f"{node.output[0]}_key{j}"), name(f"{node.output[0]}_value{j}")
        inputs = [*parts, *past, b["seqlens"][j], b["totals"][j], *node.input[7:]]
        gqa = helper.make_node("GroupQueryAttention", inputs, [y, k, v], domain=MSFT, name=name(f"{node.name}_chunk{j}"))
        gqa.attribute.extend(node.attribute)
        nodes.append(gqa)
        ys.append(y)
        past = [k, v]
    out = name(f"{node.output[0]}_chunked")
    nodes.append(helper.make_node("Concat", ys, [out], axis=1))
    return helper.make_graph(nodes, name(f"{node.name}_chunks"), [],
                             [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _whole_branch(node: onnx.NodeProto, taken: set) -> onnx.GraphProto:
    out = _fresh(f"{node.output[0]}_whole", taken)
    spare = [_fresh(f"{node.output[0]}_unused{i}", taken) for i in (1, 2)]
    gqa = helper.make_node("GroupQueryAttention", list(node.input), [out, *spare], domain=MSFT, name=node.name)
    gqa.attribute.extend(node.attribute)
    return helper.make_graph([gqa], _fresh(f"{node.name}_whole", taken), [],
                             [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def chunk_prompt_attention(model: onnx.ModelProto, chunks: int = CHUNKS, min_length: int = MIN_LENGTH) -> int:
    """Rewrite every prompt GroupQueryAttention (no past; its presents unused) of ``model`` in place; returns how
    many. All of them share one bounds subgraph, built on the first one's inputs."""
    graph = model.graph
    used = {o for n in graph.node for o in n.input} | {o.name for o in graph.output}
    sites = [n for n in graph.node if _is_prompt_gqa(n) and not any(o in used for o in n.output[1:3] if o)]
    if not sites or chunks < 2:
        return 0
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.initializer} \
        | {i.name for i in graph.input} | {n.name for n in graph.node}
    first = sites[0]
    b = _bounds(graph, first.input[0], first.input[5], chunks, min_length, taken)
    rebuilt, placed = [], False
    site_ids = {id(n) for n in sites}
    for node in graph.node:
        if id(node) not in site_ids:
            rebuilt.append(node)
            continue
        if not placed:
            rebuilt += b["nodes"]
            placed = True
        rebuilt.append(helper.make_node("If", [b["cond"]], [node.output[0]], name=_fresh(f"{node.name}_if", taken),
                                        then_branch=_chunked_branch(node, b, chunks, taken),
                                        else_branch=_whole_branch(node, taken)))
    del graph.node[:]
    graph.node.extend(rebuilt)
    return len(sites)
