"""Attention lowering (memc.codegen.attention): the choice per onnxruntime version, the torch reference ops against
plain softmax attention, and each ONNX form (GroupQueryAttention, with and without a shared past/present buffer)
against the torch ops; the layout peephole (memc.codegen.peephole) on small graphs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from memc.codegen.attention import STANDARD, choose, lengths
from memc.codegen.onnx import lower_exported
from memc.codegen.onnx_graph import subgraph_nodes
from memc.codegen.peephole import simplify_gqa_layouts

B, HQ, HKV, D = 2, 4, 2, 8


def _plain(q, k, v, past: int) -> torch.Tensor:
    """Softmax attention written out: query t (absolute position past + t) sees keys <= past + t."""
    k = k.repeat_interleave(HQ // HKV, 1)
    v = v.repeat_interleave(HQ // HKV, 1)
    s = q @ k.transpose(-1, -2) / D ** 0.5
    t, n = q.shape[2], k.shape[2]
    allowed = torch.arange(n)[None] <= torch.arange(t)[:, None] + past
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def _qkv(seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, seq, D, generator=g), torch.randn(B, HKV, seq, D, generator=g),
            torch.randn(B, HKV, seq, D, generator=g))


def test_choice_is_keyed_on_the_onnxruntime_version():
    assert choose("1.32.0").prefill == "gqa" and choose("1.32.0").kv_cache == "preallocated"
    assert choose("1.33.1").measured == "1.32.0"  # newer versions keep the newest measured choice
    assert choose("1.20.0") == STANDARD and choose("1.20.0").kv_cache == "concat"
    assert choose("1.20.0", attention="gqa").prefill == "gqa" and choose(attention="standard") == STANDARD
    with pytest.raises(ValueError, match="auto | gqa | standard"):
        choose(attention="flash")


def test_reference_ops_equal_plain_attention():
    q, k, v = _qkv(6)
    seqlens, total = lengths(B, 6)
    assert seqlens.tolist() == [5, 5] and int(total) == 6 and seqlens.dtype == torch.int32
    got = torch.ops.memc.causal_attention(q, k, v, seqlens, total, D ** -0.5)
    torch.testing.assert_close(got, _plain(q, k, v, 0), atol=1e-5, rtol=1e-5)
    # 2 new tokens after 4 cached ones, in a buffer of 9: written at 4, 5; the rest untouched
    pq, pk, pv = _qkv(6, seed=1)
    buf_k, buf_v = torch.full((B, HKV, 9, D), 7.0), torch.full((B, HKV, 9, D), 7.0)
    buf_k[:, :, :4], buf_v[:, :, :4] = pk[:, :, :4], pv[:, :, :4]
    seqlens, total = lengths(B, 2, torch.tensor(4))
    y, nk, nv = torch.ops.memc.cached_attention(pq[:, :, 4:], pk[:, :, 4:], pv[:, :, 4:], buf_k, buf_v, seqlens,
                                                total, D ** -0.5)
    torch.testing.assert_close(y, _plain(pq[:, :, 4:], pk, pv, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nk[:, :, :6], pk) and torch.testing.assert_close(nv[:, :, :6], pv)
    assert (nk[:, :, 6:] == 7).all() and (buf_k[:, :, 4:] == 7).all()  # the input buffer is not mutated
    with pytest.raises(ValueError, match="capacity 9 < past 8 \\+ 2"):
        torch.ops.memc.cached_attention(pq[:, :, 4:], pk[:, :, 4:], pv[:, :, 4:], buf_k, buf_v,
                                        *lengths(B, 2, torch.tensor(8)), D ** -0.5)


class _Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.memc.causal_attention(q, k, v, *lengths(q.shape[0], q.shape[2]), D ** -0.5)


class _Cached(torch.nn.Module):
    def forward(self, q, k, v, past_key, past_value, past_length):
        seqlens, total = lengths(q.shape[0], q.shape[2], past_length)
        return torch.ops.memc.cached_attention(q, k, v, past_key, past_value, seqlens, total, D ** -0.5)


def _lower(module, inputs, names, outputs) -> ort.InferenceSession:
    ep = torch.export.export(module, inputs, strict=False)
    model = lower_exported(ep, inputs, names, outputs, {}, 18)
    nodes = [*model.graph.node, *(s for n in model.graph.node for s in subgraph_nodes(n))]  # prompt chunks: an If
    assert any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in nodes)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_causal_attention_lowers_to_group_query_attention():
    q, k, v = _qkv(7)
    sess = _lower(_Causal(), (q, k, v), ["q", "k", "v"], ["y"])
    got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
    np.testing.assert_allclose(got, _Causal()(q, k, v).numpy(), atol=1e-5)


@pytest.mark.parametrize("past,seq,batch", [(0, 5, B), (5, 1, B), (5, 3, 1)])
def test_cached_attention_lowering_plain_and_in_place(past, seq, batch):
    """Prefill into an empty buffer, one step, and a chunk after a cache (batch 1: onnxruntime's rule); run plainly
    (onnxruntime copies into a new present) and with the present bound to the past buffer (written in place)."""
    q, k, v = (t[:batch] for t in _qkv(past + seq, seed=2))
    cap = past + seq + 3
    buf_k, buf_v = torch.zeros(batch, HKV, cap, D), torch.zeros(batch, HKV, cap, D)
    buf_k[:, :, :past], buf_v[:, :, :past] = k[:, :, :past], v[:, :, :past]
    new = (q[:, :, past:], k[:, :, past:], v[:, :, past:])
    inputs = (*new, buf_k, buf_v, torch.tensor(past))
    names = ["q", "k", "v", "past_key", "past_value", "past_length"]
    sess = _lower(_Cached(), inputs, names, ["y", "present_key", "present_value"])
    want_y, want_k, want_v = _Cached()(*inputs)
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    y, pk, pv = sess.run(None, feeds)
    np.testing.assert_allclose(y, want_y.numpy(), atol=1e-5)
    np.testing.assert_allclose(pk[:, :, :past + seq], want_k[:, :, :past + seq].numpy(), atol=1e-6)
    # in place: present_* bound to the past buffers' memory
    bk, bv = feeds["past_key"].copy(), feeds["past_value"].copy()
    io = sess.io_binding()
    for n in ("q", "k", "v", "past_length"):
        io.bind_cpu_input(n, np.ascontiguousarray(feeds[n]))
    io.bind_output("y", "cpu")
    for n, buf in (("key", bk), ("value", bv)):
        io.bind_input(f"past_{n}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        io.bind_output(f"present_{n}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    sess.run_with_iobinding(io)
    np.testing.assert_allclose(io.get_outputs()[0].numpy(), want_y.numpy(), atol=1e-5)
    np.testing.assert_allclose(bk[:, :, :past + seq], want_k[:, :, :past + seq].numpy(), atol=1e-6)
    np.testing.assert_allclose(bv[:, :, :past + seq], want_v[:, :, :past + seq].numpy(), atol=1e-6)


# -- peephole -------------------------------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, value_info=(), opset=23):
    graph = helper.make_graph(nodes, "g", inputs, outputs, value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _gqa_node(q, out):
    return helper.make_node("GroupQueryAttention", [q, q, q, "", "", "sl", "tl"], [out, f"{out}_k", f"{out}_v"],
                            domain="com.microsoft", num_heads=1, kv_num_heads=1)


def test_peephole_collapses_layout_chains_and_keeps_what_it_cannot_prove():
    shape4 = helper.make_tensor("s4", TensorProto.INT64, [4], [0, 0, 2, 8])
    back = helper.make_tensor("s3", TensorProto.INT64, [3], [0, 0, 16])
    nodes = [
        _gqa_node("x", "y"),
        helper.make_node("Reshape", ["y", "s4"], ["y4"]),                       # [B, S, 16] -> [B, S, 2, 8]
        helper.make_node("Transpose", ["y4"], ["t1"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1, 3]),       # cancels t1
        helper.make_node("Reshape", ["t2", "s3"], ["z"]),                       # back to [B, S, 16]
        helper.make_node("Relu", ["z"], ["out"]),
        helper.make_node("Transpose", ["x"], ["kept"], perm=[0, 2, 1]),         # not an inverse pair: stays
    ]
    model = _model(nodes, [_vi("x", ["b", "s", 16]), helper.make_tensor_value_info("sl", TensorProto.INT32, ["b"]),
                           helper.make_tensor_value_info("tl", TensorProto.INT32, [])],
                   [_vi("out", ["b", "s", 16]), _vi("kept", ["b", 16, "s"])],
                   [_vi("y4", ["b", "s", 2, 8]), _vi("t1", ["b", 2, "s", 8]), _vi("t2", ["b", "s", 2, 8]),
                    _vi("z", ["b", "s", 16])])
    model.graph.initializer.extend([shape4, back])
    assert simplify_gqa_layouts(model) == 4
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["GroupQueryAttention", "Relu", "Transpose"]
    assert model.graph.node[1].input[0] == "y"


def test_peephole_leaves_graphs_without_group_query_attention_alone():
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]), helper.make_node("Transpose", ["t1"], ["y"], perm=[1, 0])]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])])
    assert simplify_gqa_layouts(model) == 0 and len(model.graph.node) == 2
