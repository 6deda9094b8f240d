"""memc.codegen.prompt_chunks: a prompt GroupQueryAttention becomes an If over n chunked calls (each attending to the
earlier chunks' keys through its past inputs) or the one call; outputs unchanged on both branches."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from memc.codegen.prompt_chunks import chunk_prompt_attention
from memc.targets.session import create_session

HQ, HKV, D = 4, 2, 16


def _gqa_model(rotary: bool, packed: bool) -> onnx.ModelProto:
    """y = GroupQueryAttention(q, k, v) for input x [B, S, (HQ + 2 HKV) D], the lengths from x's shape."""
    width = (HQ + 2 * HKV) * D
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1, end=2), helper.make_node("Shape", ["x"], ["b"], end=1),
             helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
             helper.make_node("Squeeze", ["s32"], ["total"]),
             helper.make_node("Sub", ["s32", "one"], ["last"]), helper.make_node("Expand", ["last", "b"], ["seqlens"])]
    inits = [numpy_helper.from_array(np.array([1], np.int32), "one")]
    if packed:
        qkv = ["x", "", ""]
    else:
        inits.append(numpy_helper.from_array(np.array([HQ * D, HKV * D, HKV * D], np.int64), "split"))
        nodes.append(helper.make_node("Split", ["x", "split"], ["q", "k", "v"], axis=2))
        qkv = ["q", "k", "v"]
    extra = []
    if rotary:
        angles = np.arange(64)[:, None] * (100.0 ** (-np.arange(D // 2) / (D // 2)))[None]
        inits += [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                  numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
        extra = ["cos", "sin"]
    nodes.append(helper.make_node("GroupQueryAttention", [*qkv, "", "", "seqlens", "total", *extra],
                                  ["y", "present_k", "present_v"], domain="com.microsoft", name="attn",
                                  num_heads=HQ, kv_num_heads=HKV, do_rotary=int(rotary), scale=D ** -0.5))
    graph = helper.make_graph(nodes, "gqa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", HQ * D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("rotary, packed", [(True, True), (False, False)])
def test_chunked_prompt_attention_keeps_every_output(tmp_path, rotary, packed):
    before = _gqa_model(rotary, packed)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert chunk_prompt_attention(after, chunks=4, min_length=8) == 1
    onnx.checker.check_model(after)
    # Before: one GroupQueryAttention. Expected: an If whose then-branch is 4 chained calls (chunk j's past = chunk
    # j - 1's presents) joined by a Concat, and whose else-branch is the original call
    (cond,) = [n for n in after.graph.node if n.op_type == "If"]
    assert not any(n.op_type == "GroupQueryAttention" for n in after.graph.node)
    then, other = (helper.get_attribute_value(a) for a in sorted(cond.attribute, key=lambda a: a.name != "then_branch"))
    ops = collections.Counter(n.op_type for n in then.node)
    assert ops == {"GroupQueryAttention": 4, "Slice": 4 * (1 if packed else 3), "Concat": 1}
    calls = [n for n in then.node if n.op_type == "GroupQueryAttention"]
    assert list(calls[0].input[3:5]) == ["", ""]
    assert all(list(c.input[3:5]) == list(p.output[1:3]) for p, c in zip(calls, calls[1:]))
    assert [n.op_type for n in other.node] == ["GroupQueryAttention"]
    for path, model in (("before.onnx", before), ("after.onnx", after)):
        onnx.save(model, tmp_path / path)
    want, got = create_session(tmp_path / "before.onnx", 1), create_session(tmp_path / "after.onnx", 1)
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (1, 3), (1, 8), (1, 37), (2, 37)]:  # short: the one call; batch 2: the one call
        x = rng.standard_normal((batch, seq, (HQ + 2 * HKV) * D)).astype(np.float32)
        np.testing.assert_allclose(got.run(None, {"x": x})[0], want.run(None, {"x": x})[0], atol=1e-5,
                                   err_msg=f"batch {batch}, seq {seq}")


def test_attention_with_a_past_or_used_presents_is_left_alone():
    model = _gqa_model(rotary=False, packed=True)
    model.graph.output.append(helper.make_tensor_value_info("present_k", TensorProto.FLOAT, None))
    assert chunk_prompt_attention(model, chunks=4, min_length=8) == 0
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 1
