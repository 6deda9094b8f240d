"""Rotary embedding inside the decode graph's GroupQueryAttention, over a cos / sin table of fixed length; and one
short subgraph for the attention's length inputs.

A decode step of a small model is per-node overhead plus one pass over the weights (measured with
``python -m benchmarks.decode_profile``): on ref-llama the step graph onnxruntime ran had 74 nodes against
onnxruntime-genai's 49, the difference being the rotary (two RotaryEmbedding nodes per layer, the Split of the
packed q / k / v projection, and the position subgraph feeding them). GroupQueryAttention applies the rotary itself
(``do_rotary``) from caches ``cos`` / ``sin`` [positions, rotary_dim / 2] indexed by each token's position, which it
derives from ``seqlens_k``: a step's token sits at ``seqlens_k`` (= past + seq - 1), a prompt's token i at
``past + i``. So the rewrite is exact where the rotary's positions are ``past_length + Range(0, seq, 1)`` and the
attention's lengths come from the same ``past_length`` (how memc.codegen.decode_rewrite builds them).

The rule: a GroupQueryAttention with a past whose query and key are ``RotaryEmbedding`` (full rotary, the shapes
GroupQueryAttention takes) of q / k, the rotary's cos / sin being ``Cos`` / ``Sin`` of ``positions * freq`` (a 1-D
float initializer) with positions ``Range(0, n, 1) + past_length`` (through Unsqueeze / Expand / Cast / Reshape),
becomes one GroupQueryAttention on the unrotated q / k with ``do_rotary``. When q / k / v are the three outputs of
one Split (the packed projection of memc.codegen.fusion), it reads the packed tensor directly (key / value
omitted), as genai's graphs do. The table covers positions 0 .. ``positions - 1`` and is built in the graph from
constants only (Range over a constant, times the frequency initializer), so onnxruntime folds it once when the
session loads (ref-llama: 8.7 MB in memory, nothing on disk); a step beyond the table is refused by the engine,
which reads the length from the graph's ``memc.kv_cache`` metadata (``rotary_positions``). onnxruntime 1.32's
rotary inside GroupQueryAttention needs head_size % 16 == 0 (checked).

With both (``share_lengths``), ref-llama's step graph as onnxruntime runs it has 49 nodes, as many as genai's.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from memc.codegen.fusion import (_packed_split, _replace_with_rotary_gqa, _rotary_pair, _through_shape_ops,
                                  _trig_operands, _zero_based_range)
from memc.codegen.onnx_graph import (MSFT, GraphIndex, attr, drop_dead_nodes, drop_unused_initializers,
                                     is_std, unique_name)

# the table's rows: speed runs (memc eval --speed, benchmarks.decode) step from contexts up to 32k, a few steps on
ROTARY_POSITIONS = 32768 + 1024


def _offset_positions(idx: GraphIndex, pos: str, length: str) -> bool:
    """``pos`` is Range(0, n, 1) + ``length`` (the graph's past-length input), through shape-only ops and casts."""
    src = _through_shape_ops(idx, pos)
    if not is_std(src, "Add") or len(src.input) != 2:
        return False
    return any(b == length and _zero_based_range(idx, idx.producer.get(a)) for a, b in (src.input, src.input[::-1]))


def _trig_freq(idx: GraphIndex, trig: str, op: str, length: str) -> str | None:
    """The frequency initializer when ``trig`` = op(positions * freq) with positions past_length + 0..n-1."""
    return next((freq for pos, freq in _trig_operands(idx, trig, op) if _offset_positions(idx, pos, length)), None)


def _lengths_from(idx: GraphIndex, gqa: onnx.NodeProto, length: str) -> bool:
    """GroupQueryAttention's total length is Cast(past_length + seq) (memc.codegen.attention.lengths), so the
    positions it derives for the rotary are the graph's own."""
    cast = idx.producer.get(gqa.input[6])
    if not is_std(cast, "Cast"):
        return False
    add = idx.producer.get(cast.input[0])
    return is_std(add, "Add") and length in add.input


def _table(graph: onnx.GraphProto, freq: str, positions: int) -> tuple[str, str]:
    """cos / sin [positions, len(freq)] from constants only (folded by onnxruntime at load)."""
    base = unique_name(graph, freq + "_rotary_table")
    consts = [numpy_helper.from_array(np.array(v, np.int64), f"{base}_{n}")
              for n, v in (("start", 0), ("limit", positions), ("delta", 1), ("axes", [1]))]
    graph.initializer.extend(consts)
    start, limit, delta, axes = (c.name for c in consts)
    made = [helper.make_node("Range", [start, limit, delta], [base + "_pos"], name=base + "_pos"),
            helper.make_node("Unsqueeze", [base + "_pos", axes], [base + "_col"], name=base + "_col"),
            helper.make_node("Cast", [base + "_col"], [base + "_f"], to=onnx.TensorProto.FLOAT, name=base + "_f"),
            helper.make_node("Mul", [base + "_f", freq], [base + "_angles"], name=base + "_angles"),
            helper.make_node("Cos", [base + "_angles"], [base + "_cos"], name=base + "_cos"),
            helper.make_node("Sin", [base + "_angles"], [base + "_sin"], name=base + "_sin")]
    for k, n in enumerate(made):
        graph.node.insert(k, n)
    return base + "_cos", base + "_sin"


def _rotary_gqa_once(model: onnx.ModelProto, length: str, positions: int, tables: dict) -> bool:
    graph = model.graph
    idx = GraphIndex(graph)
    for gqa in graph.node:
        if gqa.op_type != "GroupQueryAttention" or gqa.domain != MSFT or len(gqa.input) != 7 or \
                not all(gqa.input[:7]) or attr(gqa, "do_rotary", 0):
            continue
        pair = _rotary_pair(idx, gqa)
        if pair is None:
            continue
        rq, rk, interleaved = pair
        freqs = {_trig_freq(idx, r.input[k], op, length) for r in (rq, rk) for k, op in ((1, "Cos"), (2, "Sin"))}
        if len(freqs) != 1 or None in freqs or not _lengths_from(idx, gqa, length):
            continue
        freq = freqs.pop()
        d = 2 * int(idx.inits[freq].dims[0])
        if d % 16:  # onnxruntime's rotary kernel inside GroupQueryAttention: head_size % 16 == 0
            continue
        q, k, v = rq.input[0], rk.input[0], gqa.input[2]
        hq, hkv = attr(gqa, "num_heads", 0), attr(gqa, "kv_num_heads", 0)
        packed = _packed_split(idx, q, k, v, hq, hkv)
        split = packed[0] if packed is not None and packed[1] == d else None
        if freq not in tables:
            tables[freq] = _table(graph, freq, positions)
        cos, sin = tables[freq]
        qkv = [split.input[0], "", ""] if split is not None else [q, k, v]
        _replace_with_rotary_gqa(graph, gqa, qkv, cos, sin, interleaved, "_rotary",
                                 (rq, rk, *([split] if split is not None else [])))
        return True
    return False


def rotary_into_attention(model: onnx.ModelProto, length_input: str, positions: int = ROTARY_POSITIONS) -> int:
    """Apply the rule to a fixpoint; returns how many attention nodes now apply the rotary themselves (the caller
    records ``positions``, the table's rows, when this is > 0)."""
    count, tables = 0, {}
    while _rotary_gqa_once(model, length_input, positions, tables):
        count += 1
    if count:
        drop_dead_nodes(model.graph)
        drop_unused_initializers(model.graph)
    return count


def share_lengths(model: onnx.ModelProto, length_input: str, ids: str = "input_ids") -> bool:
    """Every GroupQueryAttention whose lengths come from ``length_input`` reads one short subgraph for them:
    ``total = Cast(past_length + Shape(ids)[1:2])`` ([1] int32) and ``seqlens_k = Expand(total - 1,
    Shape(ids)[0:1])`` ([batch]): six nodes instead of the exporter's nine (Squeeze / Reshape / a second Cast, and
    the batch read from a KV input's shape). ``ids``: the graph input of shape [batch, seq, ...]. Returns whether
    it changed anything."""
    graph = model.graph
    idx = GraphIndex(graph)
    sites = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == MSFT and len(n.input) >= 7
             and _lengths_from(idx, n, length_input)]
    if not sites or ids not in {i.name for i in graph.input}:
        return False
    base = unique_name(graph, "gqa_lengths")
    one = numpy_helper.from_array(np.array([1], np.int32), base + "_one")
    graph.initializer.append(one)
    made = [helper.make_node("Shape", [ids], [base + "_seq"], start=1, end=2, name=base + "_seq"),
            helper.make_node("Shape", [ids], [base + "_batch"], start=0, end=1, name=base + "_batch"),
            helper.make_node("Add", [length_input, base + "_seq"], [base + "_total64"], name=base + "_total64"),
            helper.make_node("Cast", [base + "_total64"], [base + "_total"], to=onnx.TensorProto.INT32,
                             name=base + "_total"),
            helper.make_node("Sub", [base + "_total", one.name], [base + "_last"], name=base + "_last"),
            helper.make_node("Expand", [base + "_last", base + "_batch"], [base + "_seqlens"], name=base + "_seqlens")]
    for k, n in enumerate(made):
        graph.node.insert(k, n)
    for n in sites:
        n.input[5], n.input[6] = base + "_seqlens", base + "_total"
    drop_dead_nodes(graph)
    drop_unused_initializers(graph)
    return True
