"""onnxruntime fusions on lowered graphs (memc.codegen.fusion): Before / Expected graphs compared structurally, and
each fused graph run in onnxruntime against the unfused one."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from memc.codegen.fusion import fuse_for_onnxruntime, fuse_skip_rms_norm, pack_gqa_inputs, pack_matmuls

H = 16


def _model(nodes, inputs, outputs, inits=(), opset=23) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _w(name, rows, cols, seed):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32), name)


def _run(model, feeds) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _x(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- pack MatMuls ---------------------------------------------------------------------------------------------------
def _projections():
    """x -> q / k / v projections (16 -> 16 / 8 / 8) and an unrelated MatMul whose weight is shared."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("Relu", ["q"], ["q_out"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Add", ["k", "v"], ["kv"]),
        helper.make_node("MatMul", ["q_out", "shared"], ["s1"]),  # `shared` has two users: never packed
        helper.make_node("MatMul", ["x", "shared"], ["s2"]),
    ]
    inits = [_w("wq", H, 16, 1), _w("wk", H, 8, 2), _w("wv", H, 8, 3), _w("shared", H, 4, 4)]
    outs = [_vi("q_out", ["b", "s", 16]), _vi("kv", ["b", "s", 8]), _vi("s1", ["b", "s", 4]), _vi("s2", ["b", "s", 4])]
    return _model(nodes, [_vi("x", ["b", "s", H])], outs, inits)


def test_pack_matmuls_expected_graph():
    before = _projections()
    after = copy.deepcopy(before)
    assert pack_matmuls(after) == 2
    assert _ops(after) == ["MatMul", "Split", "Relu", "Add", "MatMul", "MatMul"]
    matmul, split = after.graph.node[:2]
    assert matmul.input[0] == "x" and list(split.output) == ["q", "k", "v"]
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert set(inits) == {matmul.input[1], split.input[1], "shared"}  # the three weights replaced, not duplicated
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    np.testing.assert_array_equal(inits[matmul.input[1]], np.concatenate([old["wq"], old["wk"], old["wv"]], 1))
    assert inits[split.input[1]].tolist() == [16, 8, 8]
    onnx.checker.check_model(after)
    x = _x(2, 3, H)
    for got, want in zip(_run(after, {"x": x}), _run(before, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pack_matmuls_needs_one_input_and_equal_rows():
    nodes = [helper.make_node("MatMul", ["x", "a"], ["ya"]), helper.make_node("MatMul", ["z", "b"], ["yb"]),
             helper.make_node("MatMul", ["x", "c"], ["yc"])]  # x: a (16 rows) and c (16 rows) pack; z's b stays
    model = _model(nodes, [_vi("x", [2, H]), _vi("z", [2, 8])], [_vi("ya", [2, 4]), _vi("yb", [2, 4]), _vi("yc", [2, 4])],
                   [_w("a", H, 4, 1), _w("b", 8, 4, 2), _w("c", H, 4, 3)])
    assert pack_matmuls(model) == 1
    assert _ops(model) == ["MatMul", "Split", "MatMul"] and model.graph.node[2].input[:] == ["z", "b"]
    single = _model([helper.make_node("MatMul", ["x", "a"], ["ya"])], [_vi("x", [2, H])], [_vi("ya", [2, 4])],
                    [_w("a", H, 4, 1)])
    assert pack_matmuls(single) == 0 and _ops(single) == ["MatMul"]


# -- skip RMS norm --------------------------------------------------------------------------------------------------
def _residual(sum_is_output: bool = False, bias: bool = False):
    """h = x + proj(y); n = RMSNorm(h); out = n @ w + h (the residual stream reads the sum again)."""
    nodes = [
        helper.make_node("MatMul", ["y", "wp"], ["p"]),
        helper.make_node("Add", ["x", "bias" if bias else "p"], ["h"]),
        helper.make_node("RMSNormalization", ["h", "scale"], ["n"], axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n", "wo"], ["m"]),
        helper.make_node("Add", ["m", "h"], ["out"]),
    ]
    inits = [_w("wp", H, H, 1), _w("wo", H, H, 2),
             numpy_helper.from_array(np.linspace(0.5, 1.5, H).astype(np.float32), "scale")]
    if bias:
        inits.append(numpy_helper.from_array(_x(H, seed=5), "bias"))
    outs = [_vi("out", ["b", "s", H])] + ([_vi("h", ["b", "s", H])] if sum_is_output else [])
    return _model(nodes, [_vi("x", ["b", "s", H]), _vi("y", ["b", "s", H])], outs, inits)


def test_skip_rms_norm_expected_graph():
    before = _residual()
    after = copy.deepcopy(before)
    assert fuse_skip_rms_norm(after) == 1
    assert _ops(after) == ["MatMul", "SkipSimplifiedLayerNormalization", "MatMul", "Add"]
    fused = after.graph.node[1]
    assert fused.domain == "com.microsoft" and list(fused.input) == ["x", "p", "scale"]
    assert fused.output[0] == "n" and fused.output[1] == fused.output[2] == "" and fused.output[3]
    assert list(after.graph.node[3].input) == ["m", fused.output[3]]  # the residual reads the fused sum
    assert helper.get_attribute_value(fused.attribute[0]) == np.float32(1e-6)
    assert any(o.domain == "com.microsoft" for o in after.opset_import)
    feeds = {"x": _x(2, 3, H, seed=1), "y": _x(2, 3, H, seed=2)}
    np.testing.assert_allclose(_run(after, feeds)[0], _run(before, feeds)[0], rtol=1e-5, atol=1e-5)


def test_skip_rms_norm_leaves_what_it_cannot_fuse():
    for model in (_residual(sum_is_output=True), _residual(bias=True)):  # the sum is an output / a broadcast add
        ops = _ops(model)
        assert fuse_skip_rms_norm(model) == 0 and _ops(model) == ops


def test_both_rules_on_a_layer():
    """A pre-norm layer: the residual Add + norm fuse, and two projections of the norm's output pack."""
    nodes = [
        helper.make_node("Add", ["x", "y"], ["h"]),
        helper.make_node("RMSNormalization", ["h", "scale"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n", "wg"], ["g"]),
        helper.make_node("MatMul", ["n", "wu"], ["u"]),
        helper.make_node("Mul", ["g", "u"], ["gu"]),
        helper.make_node("MatMul", ["gu", "wd"], ["d"]),
        helper.make_node("Add", ["h", "d"], ["out"]),
    ]
    inits = [_w("wg", H, 24, 1), _w("wu", H, 24, 2), _w("wd", 24, H, 3),
             numpy_helper.from_array(np.ones(H, np.float32), "scale")]
    before = _model(nodes, [_vi("x", ["b", "s", H]), _vi("y", ["b", "s", H])], [_vi("out", ["b", "s", H])], inits)
    after = copy.deepcopy(before)
    assert fuse_for_onnxruntime(after) == {"packed_matmuls": 1, "skip_rms_norms": 1, "packed_attention": 0,
                                         "chunked_prompt_attention": 0}
    assert _ops(after) == ["SkipSimplifiedLayerNormalization", "MatMul", "Split", "Mul", "MatMul", "Add"]
    feeds = {"x": _x(1, 5, H, seed=3), "y": _x(1, 5, H, seed=4)}
    np.testing.assert_allclose(_run(after, feeds)[0], _run(before, feeds)[0], rtol=1e-5, atol=1e-5)


# -- packed QKV attention ---------------------------------------------------------------------------------------------
def _attention_layer(start: float = 0.0, past: bool = False):
    """x [1, s, 16] -> packed q|k|v MatMul -> Split -> rotary q (2 heads) / k (1 head) from positions Range(start, s, 1)
    -> GroupQueryAttention (head 16), as memc lowers a prefill layer."""
    from memc.codegen.attention import _register_schema

    _register_schema()
    d, hq, hkv = 16, 2, 1
    consts = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
              [("start", start, np.float32), ("one", 1.0, np.float32), ("ax", [0, 2], np.int64),
               ("sizes", [hq * d, hkv * d, hkv * d], np.int64)]]
    freq = numpy_helper.from_array((1.0 / 10000 ** (np.arange(d // 2) / (d // 2))).astype(np.float32), "freq")
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"], start=1, end=2),
        helper.make_node("Cast", ["xs"], ["xsf"], to=TensorProto.FLOAT),
        helper.make_node("Squeeze", ["xsf"], ["n"]),
        helper.make_node("Add", ["n", "start"], ["limit"]),
        helper.make_node("Range", ["start", "limit", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax"], ["pos3"]),
        helper.make_node("Mul", ["pos3", "freq"], ["angles"]),
        helper.make_node("Cos", ["angles"], ["cos"]), helper.make_node("Sin", ["angles"], ["sin"]),
        helper.make_node("MatMul", ["x", "w"], ["qkv"]),
        helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1),
        helper.make_node("RotaryEmbedding", ["q", "cos", "sin"], ["rq"], num_heads=hq),
        helper.make_node("RotaryEmbedding", ["k", "cos", "sin"], ["rk"], num_heads=hkv),
        helper.make_node("Shape", ["x"], ["s64"], start=1, end=2),
        helper.make_node("Cast", ["s64"], ["total1"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["total1"], ["total"]),
        helper.make_node("Sub", ["total1", "one_i"], ["seqlens"]),
        helper.make_node("GroupQueryAttention", ["rq", "rk", "v", "pk" if past else "", "pv" if past else "", "seqlens",
                                                 "total"], ["y", "present_k", "present_v"], domain=MSFT_DOMAIN,
                         num_heads=hq, kv_num_heads=hkv, scale=d ** -0.5),
    ]
    one_i = numpy_helper.from_array(np.array([1], np.int32), "one_i")
    inputs = [_vi("x", [1, "s", H])]
    if past:
        inputs += [_vi("pk", [1, hkv, "p", d]), _vi("pv", [1, hkv, "p", d])]
    graph = helper.make_graph(nodes, "g", inputs, [_vi("y", [1, "s", hq * d])],
                              initializer=[*consts, freq, one_i, _w("w", H, (hq + 2 * hkv) * d, 5)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MSFT_DOMAIN, 1)])


MSFT_DOMAIN = "com.microsoft"


def test_packed_attention_expected_graph():
    before = _attention_layer()
    after = copy.deepcopy(before)
    assert pack_gqa_inputs(after) == 1
    gqa = next(n for n in after.graph.node if n.op_type == "GroupQueryAttention")
    assert gqa.input[0] == "qkv" and list(gqa.input[1:5]) == [""] * 4 and len(gqa.input) == 9
    assert {a.name: a.i for a in gqa.attribute if a.name in ("do_rotary", "rotary_interleaved")} == \
        {"do_rotary": 1, "rotary_interleaved": 0}
    assert "Split" not in _ops(after) and "RotaryEmbedding" not in _ops(after)
    x = _x(1, 11, H)
    np.testing.assert_allclose(_run(after, {"x": x})[0], _run(before, {"x": x})[0], atol=1e-5)


def test_packed_attention_needs_positions_from_zero_and_no_past():
    for model in (_attention_layer(start=3.0), _attention_layer(past=True)):
        assert pack_gqa_inputs(model) == 0 and "Split" in _ops(model)
