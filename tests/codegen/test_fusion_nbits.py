"""The pack-MatMulNBits rule (memc.codegen.fusion): Before / Expected graphs of quantized projections compared
structurally, the packed graph run in onnxruntime against the unpacked one, and the packed-QKV attention rule applying
to quantized q / k / v once they are packed."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from memc.codegen.fusion import fuse_for_onnxruntime, pack_matmul_nbits
from memc.codegen.quant import _register_schemas
from tests.codegen.test_fusion import _attention_layer

MSFT = "com.microsoft"
K = 32


def _nbits(name: str, x: str, n: int, bits: int = 4, block: int = 16, zeros: bool = True, half: bool = True,
           level: int = 0, seed: int = 0, k: int = K) -> tuple[list, list]:
    """One MatMulNBits ``name`` = x @ W^T, W [n, k] random codes / scales (float16 + Cast, or float32) / zero points."""
    rng = np.random.default_rng(seed)
    blocks = k // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8), name + "_codes")]
    scales = (rng.random((n, blocks)) * 0.1 + 0.01).astype(np.float16 if half else np.float32)
    nodes = []
    if half:
        inits.append(numpy_helper.from_array(scales, name + "_s16"))
        nodes.append(helper.make_node("Cast", [name + "_s16"], [name + "_scales"], to=TensorProto.FLOAT))
    else:
        inits.append(numpy_helper.from_array(scales, name + "_scales"))
    ins = [x, name + "_codes", name + "_scales"]
    if zeros:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, -(-blocks * bits // 8)), dtype=np.uint8),
                                             name + "_zeros"))
        ins.append(name + "_zeros")
    nodes.append(helper.make_node("MatMulNBits", ins, [name], domain=MSFT, K=k, N=n, bits=bits, block_size=block,
                                  accuracy_level=level))
    return nodes, inits


def _model(parts, outputs, extra_nodes=()) -> onnx.ModelProto:
    _register_schemas()
    nodes = [n for p in parts for n in p[0]] + list(extra_nodes)
    inits = [t for p in parts for t in p[1]]
    vi = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])], vi,
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MSFT, 1)])


def _run(model, x) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _projections():
    """q / k / v (4-bit affine, float16 scales), gate / up (4-bit symmetric, float32 scales), an 8-bit and a
    symmetric-4-bit sibling of q (other bits / zero-point-ness: never with q), and one whose codes another node reads."""
    parts = [_nbits("q", "x", 32, seed=1), _nbits("k", "x", 16, seed=2), _nbits("v", "x", 16, seed=3),
             _nbits("g", "x", 24, zeros=False, half=False, seed=4), _nbits("u", "x", 24, zeros=False, half=False, seed=5),
             _nbits("e8", "x", 8, bits=8, seed=6), _nbits("shared", "x", 8, seed=7)]
    reader = helper.make_node("Cast", ["shared_codes"], ["codes_out"], to=TensorProto.FLOAT)
    return _model(parts, ["q", "k", "v", "g", "u", "e8", "shared", "codes_out"], [reader])


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_pack_matmul_nbits_expected_graph():
    before = _projections()
    after = copy.deepcopy(before)
    assert pack_matmul_nbits(after) == 3  # q|k|v: 3 -> 1, g|u: 2 -> 1
    assert _ops(before).count("MatMulNBits") == 7 and _ops(after).count("MatMulNBits") == 4
    assert _ops(after).count("Split") == 2 and _ops(after).count("Cast") == 4  # q|k|v, e8, shared, the reader
    mm = {n.output[0]: n for n in after.graph.node if n.op_type == "MatMulNBits"}
    splits = {tuple(n.output): n for n in after.graph.node if n.op_type == "Split"}
    assert set(splits) == {("q", "k", "v"), ("g", "u")}
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    qkv = mm[splits[("q", "k", "v")].input[0]]
    attrs = {a.name: a.i for a in qkv.attribute}
    assert attrs == {"K": K, "N": 64, "bits": 4, "block_size": 16, "accuracy_level": 0}
    assert inits[splits[("q", "k", "v")].input[1]].tolist() == [32, 16, 16]
    np.testing.assert_array_equal(inits[qkv.input[1]], np.concatenate([old[f"{p}_codes"] for p in "qkv"]))
    np.testing.assert_array_equal(inits[qkv.input[3]], np.concatenate([old[f"{p}_zeros"] for p in "qkv"]))
    cast = next(n for n in after.graph.node if n.output[0] == qkv.input[2])
    assert cast.op_type == "Cast" and inits[cast.input[0]].dtype == np.float16  # float16 stored, as before
    np.testing.assert_array_equal(inits[cast.input[0]], np.concatenate([old[f"{p}_s16"] for p in "qkv"]))
    gu = mm[splits[("g", "u")].input[0]]
    assert len(gu.input) == 3 and inits[gu.input[2]].dtype == np.float32
    assert {"e8", "shared"} <= set(mm)  # left alone
    stored = lambda m: sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)  # noqa: E731
    assert stored(after) == stored(before) + 8 * (3 + 2)  # the same tensors, plus the Splits' sizes
    assert len(after.graph.initializer) < len(before.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 5, K)).astype(np.float32)
    for got, want in zip(_run(after, x), _run(before, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pack_matmul_nbits_needs_equal_formats():
    parts = [_nbits("a", "x", 16, seed=1), _nbits("b", "x", 16, block=32, seed=2), _nbits("c", "x", 16, level=4, seed=3),
             _nbits("d", "x", 16, zeros=False, seed=4)]  # other block, other accuracy level, no zero points
    model = _model(parts, ["a", "b", "c", "d"])
    assert pack_matmul_nbits(model) == 0 and _ops(model).count("MatMulNBits") == 4


def test_quantized_qkv_get_packed_attention():
    """The attention layer of test_fusion with q / k / v as three MatMulNBits (head 16): packing them lets the
    packed-QKV attention rule read the packed projection, as in fp32 graphs."""
    layer = _attention_layer()
    keep = [n for n in layer.graph.node if not (n.op_type in ("MatMul", "Split") and n.output[0] in ("qkv", "q"))]
    del layer.graph.node[:]
    qkv = [_nbits(name, "x", n, seed=s, k=16) for name, n, s in (("q", 32, 1), ("k", 16, 2), ("v", 16, 3))]
    at = next(i for i, n in enumerate(keep) if n.op_type == "RotaryEmbedding")
    layer.graph.node.extend(keep[:at] + [n for p in qkv for n in p[0]] + keep[at:])
    layer.graph.initializer.extend(t for p in qkv for t in p[1])
    _register_schemas()
    before = copy.deepcopy(layer)
    assert fuse_for_onnxruntime(layer) == {"packed_matmuls": 2, "skip_rms_norms": 0, "packed_attention": 1,
                                         "chunked_prompt_attention": 1}
    assert _ops(layer).count("MatMulNBits") == 1 and "Split" not in _ops(layer) and "RotaryEmbedding" not in _ops(layer)
    x = np.random.default_rng(1).standard_normal((1, 11, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(layer, x)[0], _run(before, x)[0], atol=1e-5)
