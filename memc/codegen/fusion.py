"""Operator fusions on a lowered ONNX graph, for onnxruntime's CPU kernels: fewer, larger nodes.

A decode step of a small model is per-node overhead plus one pass over the weights, so fewer nodes over the same
weights are faster (measured with ``python -m benchmarks.decode_profile``). Four rules, each a plain rewrite of the
ONNX graph (no onnxruntime needed to apply them):

* **pack MatMuls**: MatMuls that read the same input with 2-D float weight initializers of the same row count
  (a layer's q / k / v projections, its gate / up projections) become one MatMul over the weights concatenated
  along the output axis and a Split back into the original outputs. Each weight must be used by that MatMul only
  (so the packed weight replaces, not duplicates, them).
* **pack MatMulNBits**: the same for onnxruntime's quantized MatMul (memc.codegen.quant): ``MatMulNBits`` nodes
  reading the same input with equal K, bits, block size, accuracy level and zero-point-ness (a layer's tied q / k / v
  or gate / up formats) become one ``MatMulNBits`` over codes, scales and zero points concatenated along N (all three
  are N-major, so concatenation along axis 0 is the packed layout; float16 scales keep their one Cast) and a Split.
  Same bytes stored (one Split-size initializer more, fewer Casts), same numbers per column, and the packed-QKV
  attention rule then applies to quantized graphs as to fp32 ones.
* **skip RMS norm**: ``Add(a, b)`` (both computed [batch, seq, hidden] values, the sum not a graph output) feeding the standard ``RMSNormalization`` over the last axis (the residual add
  before a layer's norm) becomes ``com.microsoft`` SkipSimplifiedLayerNormalization, whose fourth output is the
  sum for the residual stream. onnxruntime 1.32 fuses this pattern only for its own SimplifiedLayerNormalization,
  not for opset-23 RMSNormalization (its optimized graph keeps the Add).

* **packed QKV attention**: a GroupQueryAttention without a past (model.onnx) whose query and key are
  ``RotaryEmbedding`` of two outputs of one Split and whose value is the third (the packed q / k / v MatMul) reads
  the packed projection directly (key / value omitted) and applies the rotary itself (``do_rotary``), with cos / sin
  caches [seq, rotary_dim / 2] computed in the graph from the positions 0..seq-1 — the graph's own ``Range`` — so
  no context cap. Applies only where the rotary's cos / sin provably come from those positions (Range(0, n, 1)
  through Unsqueeze / Expand / Cast / Reshape, times a 1-D frequency initializer): GroupQueryAttention rotates a
  prompt's token i at position i. Graphs with a past (decode steps) are not matched here: their positions start at
  the past length, and memc.codegen.decode_fusion gives them a cos / sin table covering the KV buffer instead. onnxruntime 1.32's rotary inside
  GroupQueryAttention needs head_size % 16 == 0 (checked).

The rules keep every graph output and the nodes' topological order; unused initializers are dropped.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from memc.codegen.onnx_graph import (MSFT, GraphIndex, attr, const_value, drop_dead_nodes, drop_unused_initializers,
                                     is_std, unique_name)


def _pack_once(graph: onnx.GraphProto) -> bool:
    idx = GraphIndex(graph)
    position = {id(n): k for k, n in enumerate(graph.node)}
    for x, users in idx.users.items():
        group = [n for n in users if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) == 2
                 and n.input[0] == x and n.input[1] != x and idx.weight(n.input[1]) is not None]
        by_rows: dict[tuple[int, int], list[onnx.NodeProto]] = {}
        for n in group:
            w = idx.inits[n.input[1]]
            by_rows.setdefault((w.dims[0], w.data_type), []).append(n)
        for (_, dtype), nodes in by_rows.items():
            if len(nodes) < 2:
                continue
            nodes.sort(key=lambda n: position[id(n)])
            weights = [numpy_helper.to_array(idx.inits[n.input[1]]) for n in nodes]
            packed = numpy_helper.from_array(np.concatenate(weights, axis=1),
                                             unique_name(graph, nodes[0].input[1] + "_packed"))
            sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64),
                                            unique_name(graph, nodes[0].input[1] + "_split"))
            graph.initializer.extend([packed, sizes])
            out = unique_name(graph, nodes[0].output[0] + "_packed")
            matmul = helper.make_node("MatMul", [x, packed.name], [out], name=(nodes[0].name or "matmul") + "_packed")
            split = helper.make_node("Split", [out, sizes.name], [n.output[0] for n in nodes], axis=-1,
                                     name=(nodes[0].name or "matmul") + "_split")
            first = position[id(nodes[0])]
            for n in nodes:
                graph.node.remove(n)
            graph.node.insert(first, split)
            graph.node.insert(first, matmul)
            return True
    return False


def _skip_norm_once(model: onnx.ModelProto) -> bool:
    graph = model.graph
    shapes = _shapes(model)
    idx = GraphIndex(graph)
    for norm in graph.node:
        if norm.op_type != "RMSNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.input) < 2:
            continue
        add = idx.producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(norm.output) != 1:
            continue
        scale = idx.inits.get(norm.input[1])
        want = (3, scale.dims[0]) if scale is not None and len(scale.dims) == 1 else None  # [batch, seq, hidden]
        if want is None or shapes.get(add.input[0]) != want or shapes.get(add.input[1]) != want \
                or attr(norm, "axis", -1) != -1 or attr(norm, "stash_type", 1) != 1:
            continue
        total = add.output[0]
        if total in idx.outputs:  # the sum is a graph output: leave the pair (its name must stay)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for u in idx.users.get(total, [])
               for a in u.attribute):  # read inside a subgraph: renaming there is not worth the rule
            continue
        keep_sum = any(u is not norm for u in idx.users.get(total, []))
        fused_sum = unique_name(graph, total + "_skip") if keep_sum else ""
        fused = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", fused_sum] if keep_sum else [norm.output[0]], domain=MSFT,
            name=(norm.name or "rms") + "_skip", epsilon=float(attr(norm, "epsilon", 1e-5)))
        at = list(graph.node).index(add)
        graph.node.remove(norm)
        if keep_sum:
            idx.rename_uses(total, fused_sum)
        graph.node.remove(add)
        graph.node.insert(at, fused)
        return True
    return False


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(rank, static size of the last axis) of the values a node computes or the graph takes: the exporter's
    value_info where a standard op made the value, and through MatMul weights, MatMulNBits, embedding Gathers (plain and
    block-quantized), elementwise ops, norms, rotary embeddings and GroupQueryAttention where it did not (contrib ops' recorded shapes are placeholders). Initializers are left out: the fused op
    does not take a broadcast skip."""
    graph = model.graph
    recorded: dict[str, tuple[int, int | None]] = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = v.type.tensor_type
        if t.HasField("shape") and t.shape.dim:
            last = t.shape.dim[-1]
            recorded[v.name] = (len(t.shape.dim), int(last.dim_value) if last.HasField("dim_value") else None)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    shapes = {i.name: recorded[i.name] for i in graph.input if i.name in recorded}
    for n in graph.node:  # topological order: a node's inputs are sized before its outputs
        out = n.output[0] if n.output else ""
        shape = None
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and n.input[0] in shapes:
            shape = (shapes[n.input[0]][0], int(inits[n.input[1]].dims[-1]))
        elif n.op_type == "Gather" and n.input[0] in inits and attr(n, "axis", 0) == 0 and \
                len(inits[n.input[0]].dims) == 2 and n.input[1] in shapes:  # an embedding lookup
            shape = (shapes[n.input[1]][0] + 1, int(inits[n.input[0]].dims[-1]))
        elif n.op_type in ("Add", "Mul") and len(n.input) == 2 and n.input[0] in shapes and \
                shapes[n.input[0]] == shapes.get(n.input[1]):
            shape = shapes[n.input[0]]
        elif n.op_type in ("RMSNormalization", "RotaryEmbedding", "Relu", "Sigmoid", "Cast") and n.input \
                and n.input[0] in shapes:  # the input's shape
            shape = shapes[n.input[0]]
        elif n.op_type == "MatMulNBits" and n.input[0] in shapes and attr(n, "N", 0):
            shape = (shapes[n.input[0]][0], int(attr(n, "N", 0)))
        elif n.op_type == "GatherBlockQuantized" and n.input[1] in shapes and _gathered_width(n, inits, producer):
            shape = (shapes[n.input[1]][0] + 1, _gathered_width(n, inits, producer))
        elif n.op_type == "GroupQueryAttention" and len(n.input) > 2 and n.input[1] and n.input[0] in shapes:
            shape = shapes[n.input[0]]  # [batch, seq, heads * head_dim], the query's (unpacked)
        elif n.op_type == "SkipSimplifiedLayerNormalization" and n.input[0] in shapes:
            for o in n.output:
                if o:
                    shapes[o] = shapes[n.input[0]]
            continue
        elif n.domain in ("", "ai.onnx") and out in recorded:
            shape = recorded[out]
        if shape is not None and out:
            shapes[out] = shape
    return shapes


def _gathered_width(node: onnx.NodeProto, inits: dict, producer: dict) -> int | None:
    """The row width a quantized embedding lookup (GatherBlockQuantized over axis 0, blocks along axis 1) returns:
    the packed row's bytes * 8 / bits, the data being an initializer or a Reshape of one to a constant shape."""
    if attr(node, "gather_axis", 0) != 0 or attr(node, "quantize_axis", 1) != 1:
        return None
    data = node.input[0]
    if data in inits and len(inits[data].dims) == 2:
        cols = int(inits[data].dims[1])
    else:
        reshape = producer.get(data)
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[1] not in inits:
            return None
        target = numpy_helper.to_array(inits[reshape.input[1]])
        if target.shape != (2,) or target[1] <= 0:
            return None
        cols = int(target[1])
    return cols * 8 // int(attr(node, "bits", 4))


_POSITION_OPS = ("Unsqueeze", "Expand", "Cast", "Reshape")


def _through_shape_ops(idx: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The producer of ``name`` past any Unsqueeze / Expand / Cast / Reshape (ops that keep the values)."""
    src = idx.producer.get(name)
    while src is not None and src.op_type in _POSITION_OPS and src.domain in ("", "ai.onnx"):
        src = idx.producer.get(src.input[0])
    return src


def _zero_based_range(idx: GraphIndex, node: onnx.NodeProto | None) -> bool:
    """``node`` is Range(0, n, 1)."""
    if not is_std(node, "Range"):
        return False
    start, delta = const_value(idx, node.input[0]), const_value(idx, node.input[2])
    return start is not None and delta is not None and start.size == 1 and delta.size == 1 and \
        float(start.reshape(())) == 0 and float(delta.reshape(())) == 1


def _trig_operands(idx: GraphIndex, trig: str, op: str) -> list[tuple[str, str]]:
    """(positions, frequency initializer) readings of ``trig`` = op(positions * freq), freq a 1-D float
    initializer: both operand orders of the Mul that qualify."""
    node = idx.producer.get(trig)
    if not is_std(node, op):
        return []
    mul = idx.producer.get(node.input[0])
    if not is_std(mul, "Mul") or len(mul.input) != 2:
        return []
    out = []
    for pos, freq in (mul.input, mul.input[::-1]):
        f = idx.inits.get(freq)
        if f is not None and len(f.dims) == 1 and f.data_type == onnx.TensorProto.FLOAT:
            out.append((pos, freq))
    return out


def _positions(idx: GraphIndex, trig: str, op: str) -> tuple[str, str] | None:
    """(Range output, frequency initializer) when ``trig`` = op(positions * freq) with positions 0..n-1 per row."""
    for pos, freq in _trig_operands(idx, trig, op):
        src = _through_shape_ops(idx, pos)
        if _zero_based_range(idx, src):
            return src.output[0], freq
    return None


def _rotary_pair(idx: GraphIndex, gqa: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto, int] | None:
    """(query rotary, key rotary, interleaved) when ``gqa``'s query and key are standard RotaryEmbedding nodes it can
    apply itself: full rotary from cos / sin inputs, the same interleaving, its own head counts, and outputs that
    only ``gqa`` reads."""
    rq, rk = idx.producer.get(gqa.input[0]), idx.producer.get(gqa.input[1])
    if rq is None or rk is None or any(not is_std(r, "RotaryEmbedding") or len([i for i in r.input if i]) != 3
                                       or attr(r, "rotary_embedding_dim", 0) for r in (rq, rk)):
        return None
    interleaved = attr(rq, "interleaved", 0)
    if attr(rk, "interleaved", 0) != interleaved or \
            (attr(rq, "num_heads", 0), attr(rk, "num_heads", 0)) != (attr(gqa, "num_heads", 0), attr(gqa, "kv_num_heads", 0)):
        return None
    if any(o in idx.outputs or len(idx.users.get(o, [])) != 1 for o in (rq.output[0], rk.output[0])):
        return None
    return rq, rk, interleaved


def _packed_split(idx: GraphIndex, q: str, k: str, v: str, hq: int, hkv: int) -> tuple[onnx.NodeProto, int] | None:
    """(Split, head_dim) when q / k / v are the three outputs of one Split of a computed tensor along its last axis,
    read only once each, in sizes [hq * d, hkv * d, hkv * d] (the packed projection of ``pack_matmuls``)."""
    split = idx.producer.get(q)
    if not is_std(split, "Split") or list(split.output) != [q, k, v] or attr(split, "axis", 0) not in (-1, 2) \
            or split.input[0] in idx.inits:
        return None
    if any(len(idx.users.get(o, [])) != 1 or o in idx.outputs for o in split.output):
        return None
    sizes = const_value(idx, split.input[1]) if len(split.input) > 1 else None
    d = int(sizes.reshape(-1)[0]) // hq if sizes is not None and sizes.size == 3 and hq and hkv else 0
    if not d or list(sizes.reshape(-1)) != [hq * d, hkv * d, hkv * d]:
        return None
    return split, d


def _replace_with_rotary_gqa(graph: onnx.GraphProto, gqa: onnx.NodeProto, qkv: list[str], cos: str, sin: str,
                             interleaved: int, suffix: str, removed: tuple[onnx.NodeProto, ...]) -> None:
    """``gqa`` becomes a GroupQueryAttention on ``qkv`` (+ its past / lengths inputs) applying the rotary itself from
    ``cos`` / ``sin``; the ``removed`` nodes (its RotaryEmbeddings, a packed Split) go."""
    attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
    attrs.update(do_rotary=1, rotary_interleaved=int(interleaved))
    fused = helper.make_node("GroupQueryAttention", [*qkv, *gqa.input[3:7], cos, sin], list(gqa.output),
                             domain=MSFT, name=(gqa.name or "gqa") + suffix, **attrs)
    graph.node.insert(list(graph.node).index(gqa), fused)
    for n in (gqa, *removed):
        graph.node.remove(n)


def _packed_gqa_once(model: onnx.ModelProto, caches: dict) -> bool:
    graph = model.graph
    idx = GraphIndex(graph)
    for gqa in graph.node:
        if gqa.op_type != "GroupQueryAttention" or gqa.domain != MSFT or len(gqa.input) != 7 or \
                any(gqa.input[3:5]) or not all(gqa.input[:3]) or attr(gqa, "do_rotary", 0):
            continue
        pair = _rotary_pair(idx, gqa)
        if pair is None:
            continue
        rq, rk, interleaved = pair
        hq, hkv = attr(gqa, "num_heads", 0), attr(gqa, "kv_num_heads", 0)
        packed = _packed_split(idx, rq.input[0], rk.input[0], gqa.input[2], hq, hkv)
        if packed is None or packed[1] % 16:  # its rotary kernel: head_size % 16 == 0
            continue
        split = packed[0]
        trig = [_positions(idx, r.input[k], op) for r in (rq, rk) for k, op in ((1, "Cos"), (2, "Sin"))]
        if any(t is None for t in trig) or len(set(trig)) != 1:
            continue
        positions, freq = trig[0]
        if (positions, freq) not in caches:
            base = unique_name(graph, positions + "_rotary")
            axes = numpy_helper.from_array(np.array([1], np.int64), base + "_axes")
            graph.initializer.append(axes)
            made = [helper.make_node("Unsqueeze", [positions, axes.name], [base + "_col"], name=base + "_col"),
                    helper.make_node("Cast", [base + "_col"], [base + "_f"], to=onnx.TensorProto.FLOAT, name=base + "_f"),
                    helper.make_node("Mul", [base + "_f", freq], [base + "_angles"], name=base + "_angles"),
                    helper.make_node("Cos", [base + "_angles"], [base + "_cos"], name=base + "_cos"),
                    helper.make_node("Sin", [base + "_angles"], [base + "_sin"], name=base + "_sin")]
            at = list(graph.node).index(idx.producer[positions]) + 1
            for k, n in enumerate(made):
                graph.node.insert(at + k, n)
            caches[(positions, freq)] = (base + "_cos", base + "_sin")
        cos, sin = caches[(positions, freq)]
        _replace_with_rotary_gqa(graph, gqa, [split.input[0], "", ""], cos, sin, interleaved, "_packed",
                                 (rq, rk, split))
        return True
    return False


def pack_gqa_inputs(model: onnx.ModelProto) -> int:
    """Apply the packed-QKV-attention rule to a fixpoint; returns how many attention nodes read a packed input."""
    count, caches = 0, {}
    while _packed_gqa_once(model, caches):
        count += 1
    if count:
        drop_dead_nodes(model.graph)
        drop_unused_initializers(model.graph)
    return count


def pack_matmuls(model: onnx.ModelProto) -> int:
    """Apply the pack-MatMuls rule to a fixpoint; returns how many MatMuls went away."""
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    while _pack_once(model.graph):
        pass
    drop_unused_initializers(model.graph)
    return before - sum(n.op_type == "MatMul" for n in model.graph.node)


def _nbits_parts(idx: GraphIndex, node: onnx.NodeProto) -> tuple | None:
    """(codes, scales, scale Cast or None, zero points or None) initializers of a MatMulNBits whose stored tensors
    only it reads (so packing moves them, never copies), or None. Scales are a float32 initializer or a Cast of a
    float16 one (memc.codegen.quant.store_half_scales)."""
    if len(node.input) < 3 or any(node.input[4:]):  # g_idx / bias: not packed
        return None
    def only_here(name: str, user: onnx.NodeProto) -> onnx.TensorProto | None:
        t = idx.inits.get(name)
        users = idx.users.get(name, [])
        return t if t is not None and len(users) == 1 and users[0] is user and name not in idx.outputs else None
    codes = only_here(node.input[1], node)
    zeros = only_here(node.input[3], node) if len(node.input) > 3 and node.input[3] else None
    if codes is None or (len(node.input) > 3 and node.input[3] and zeros is None):
        return None
    cast = None
    scales = only_here(node.input[2], node)
    if scales is None:
        cast = idx.producer.get(node.input[2])
        if cast is None or cast.op_type != "Cast" or len(idx.users.get(node.input[2], [])) != 1 or \
                node.input[2] in idx.outputs:
            return None
        scales = only_here(cast.input[0], cast)
        if scales is None:
            return None
    return codes, scales, cast, zeros


def _pack_nbits_once(graph: onnx.GraphProto) -> bool:
    idx = GraphIndex(graph)
    position = {id(n): k for k, n in enumerate(graph.node)}
    for x, users in idx.users.items():
        groups: dict[tuple, list[tuple[onnx.NodeProto, tuple]]] = {}
        for n in users:
            if n.op_type != "MatMulNBits" or n.domain != MSFT or n.input[0] != x:
                continue
            parts = _nbits_parts(idx, n)
            if parts is None:
                continue
            codes, scales, cast, zeros = parts
            key = (tuple(attr(n, a, 0) for a in ("K", "bits", "block_size", "accuracy_level")), zeros is not None,
                   scales.data_type, cast is not None and attr(cast, "to", 0), tuple(codes.dims[1:]), len(scales.dims),
                   tuple(zeros.dims[1:]) if zeros is not None else None)
            groups.setdefault(key, []).append((n, parts))
        for members in groups.values():
            if len(members) < 2:
                continue
            members.sort(key=lambda m: position[id(m[0])])
            first = members[0][0]
            base = first.output[0] + "_packed"

            def concat(k: int, suffix: str) -> onnx.TensorProto:
                t = numpy_helper.from_array(np.concatenate([numpy_helper.to_array(m[1][k]) for m in members], axis=0),
                                            unique_name(graph, base + suffix))
                graph.initializer.append(t)
                return t
            codes, scales = concat(0, "_codes"), concat(1, "_scales")
            zeros = concat(3, "_zeros") if members[0][1][3] is not None else None
            made = []
            scale_in = scales.name
            if members[0][1][2] is not None:
                scale_in = unique_name(graph, base + "_scales_f32")
                made.append(helper.make_node("Cast", [scales.name], [scale_in], to=attr(members[0][1][2], "to", 0),
                                             name=scale_in))
            sizes = [int(attr(m[0], "N", 0)) for m in members]
            split_sizes = numpy_helper.from_array(np.array(sizes, np.int64), unique_name(graph, base + "_split"))
            graph.initializer.append(split_sizes)
            attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
            attrs["N"] = sum(sizes)
            out = unique_name(graph, base)
            made.append(helper.make_node("MatMulNBits", [x, codes.name, scale_in] + ([zeros.name] if zeros else []),
                                         [out], domain=MSFT, name=out, **attrs))
            made.append(helper.make_node("Split", [out, split_sizes.name], [m[0].output[0] for m in members], axis=-1,
                                         name=out + "_split"))
            at = position[id(first)]
            for n, (_, _, cast, _) in members:
                graph.node.remove(n)
                if cast is not None:
                    graph.node.remove(cast)
                    at -= position[id(cast)] < position[id(first)]
            for k, n in enumerate(made):
                graph.node.insert(at + k, n)
            return True
    return False


def pack_matmul_nbits(model: onnx.ModelProto) -> int:
    """Apply the pack-MatMulNBits rule to a fixpoint; returns how many MatMulNBits nodes went away."""
    count = lambda: sum(n.op_type == "MatMulNBits" and n.domain == MSFT for n in model.graph.node)  # noqa: E731
    before = count()
    while _pack_nbits_once(model.graph):
        pass
    drop_unused_initializers(model.graph)
    return before - count()


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """Apply the skip-RMS-norm rule to a fixpoint; returns how many Add + RMSNormalization pairs were fused."""
    count = 0
    while _skip_norm_once(model):
        count += 1
    if count and not any(o.domain == MSFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MSFT, 1))
    return count


def fuse_for_onnxruntime(model: onnx.ModelProto) -> dict[str, int]:
    """The rules (the norms first: they read value shapes that packing would route through Splits; the packed
    attention after the packing: it reads the packing's Splits; prompt attention in chunks last, on the packed
    attention); returns what each did."""
    from memc.codegen.prompt_chunks import chunk_prompt_attention

    norms = fuse_skip_rms_norm(model)
    packed = pack_matmuls(model) + pack_matmul_nbits(model)
    attention = pack_gqa_inputs(model)
    return {"packed_matmuls": packed, "skip_rms_norms": norms, "packed_attention": attention,
            "chunked_prompt_attention": chunk_prompt_attention(model)}
