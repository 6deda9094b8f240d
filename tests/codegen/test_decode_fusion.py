"""Rotary inside the decode graph's GroupQueryAttention (memc.codegen.decode_fusion): the rewritten graph's nodes,
its outputs in onnxruntime against the unfused graph for a prefill, a step and a continued prompt, what it refuses,
the table onnxruntime folds at load, and a tiny Llama with head_dim 16 end to end through DecodeEngine."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from memc.codegen.decode_fusion import ROTARY_POSITIONS, rotary_into_attention, share_lengths

D, HQ, HKV, H, CAP = 16, 2, 1, 16, 24
MSFT = "com.microsoft"


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _layer(packed: bool = True, offset: bool = True, lengths_from_past: bool = True) -> onnx.ModelProto:
    """x [1, s, 16] + past_length + KV buffers [1, 1, CAP, 16] -> q / k / v projections -> rotary (positions
    past_length + Range(0, s, 1), or Range alone without ``offset``) -> GroupQueryAttention, as memc lowers a decode
    layer. ``packed``: one q|k|v MatMul and a Split (memc.codegen.fusion), else three MatMuls."""
    from memc.codegen.attention import _register_schema

    _register_schema()
    c = lambda name, v, dt: numpy_helper.from_array(np.array(v, dt), name)  # noqa: E731
    rng = np.random.default_rng(5)
    freq = numpy_helper.from_array((1.0 / 10000 ** (np.arange(D // 2) / (D // 2))).astype(np.float32), "freq")
    inits = [c("zero", 0, np.int64), c("one", 1, np.int64), c("ax", [0, 2], np.int64), c("ax0", [0], np.int64),
             c("sizes", [HQ * D, HKV * D, HKV * D], np.int64), c("row", [1], np.int64), freq]
    nodes = [
        helper.make_node("Shape", ["x"], ["s1"], start=1, end=2),
        helper.make_node("Squeeze", ["s1", "ax0"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["ar"]),
        helper.make_node("Add", ["ar", "past_length"] if offset else ["ar", "zero"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax"], ["pos3"]),
        helper.make_node("Cast", ["pos3"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["posf", "freq"], ["angles"]),
        helper.make_node("Cos", ["angles"], ["cos"]), helper.make_node("Sin", ["angles"], ["sin"]),
    ]
    if packed:
        w = rng.standard_normal((H, (HQ + 2 * HKV) * D)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
        nodes += [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
                  helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1)]
    else:
        for name, width in (("q", HQ * D), ("k", HKV * D), ("v", HKV * D)):
            inits.append(numpy_helper.from_array(rng.standard_normal((H, width)).astype(np.float32), "w" + name))
            nodes.append(helper.make_node("MatMul", ["x", "w" + name], [name]))
    nodes += [
        helper.make_node("RotaryEmbedding", ["q", "cos", "sin"], ["rq"], num_heads=HQ),
        helper.make_node("RotaryEmbedding", ["k", "cos", "sin"], ["rk"], num_heads=HKV),
        helper.make_node("Add", ["past_length" if lengths_from_past else "zero", "n"], ["total64"]),
        helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
        helper.make_node("Sub", ["total64", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["last32"], to=TensorProto.INT32),
        helper.make_node("Reshape", ["last32", "row"], ["seqlens"]),
        helper.make_node("GroupQueryAttention", ["rq", "rk", "v", "pk", "pv", "seqlens", "total"],
                         ["y", "present_k", "present_v"], domain=MSFT, num_heads=HQ, kv_num_heads=HKV, scale=D ** -0.5),
    ]
    inputs = [_vi("x", [1, "s", H]), _vi("past_length", [], TensorProto.INT64),
              _vi("pk", [1, HKV, CAP, D]), _vi("pv", [1, HKV, CAP, D])]
    outputs = [_vi("y", [1, "s", HQ * D]), _vi("present_k", [1, HKV, CAP, D]), _vi("present_v", [1, HKV, CAP, D])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MSFT, 1)])


def _session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(past: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((2, 1, HKV, CAP, D)).astype(np.float32)
    return {"x": rng.standard_normal((1, seq, H)).astype(np.float32), "past_length": np.array(past, np.int64),
            "pk": kv[0], "pv": kv[1]}


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("packed", [True, False])
def test_rotary_moves_into_attention(packed):
    before = _layer(packed)
    after = copy.deepcopy(before)
    assert rotary_into_attention(after, "past_length", positions=64) == 1
    onnx.checker.check_model(after)
    gqa = next(n for n in after.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: a.i for a in gqa.attribute if a.name in ("do_rotary", "rotary_interleaved")}
    assert attrs == {"do_rotary": 1, "rotary_interleaved": 0} and len(gqa.input) == 9
    if packed:  # the packed projection goes in whole: no Split
        assert gqa.input[0] == "qkv" and list(gqa.input[1:3]) == ["", ""] and "Split" not in _ops(after)
    else:
        assert list(gqa.input[:3]) == ["q", "k", "v"]
    assert "RotaryEmbedding" not in _ops(after)
    # the per-call position subgraph is gone; the table is built from constants only
    assert "Add" in _ops(after) and not any(n.op_type == "Range" and "n" in n.input for n in after.graph.node)
    want, got = _session(before), _session(after)
    for past, seq in ((0, 5), (7, 1), (4, 3), (23, 1)):  # prefill, a step, a continued prompt, the buffer's last slot
        feeds = _feeds(past, seq, seed=past + seq)
        for a, b in zip(got.run(None, feeds), want.run(None, feeds)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"past {past}, seq {seq}")


def test_one_lengths_subgraph():
    before = _layer()
    after = copy.deepcopy(before)
    assert rotary_into_attention(after, "past_length") == 1
    fused = copy.deepcopy(after)
    assert share_lengths(after, "past_length", ids="x")  # x [batch, seq, hidden]: its first two axes are the ids'
    onnx.checker.check_model(after)
    assert len(after.graph.node) < len(fused.graph.node) and "Reshape" not in _ops(after)
    want, got = _session(before), _session(after)
    for past, seq in ((0, 5), (7, 1), (4, 3)):
        feeds = _feeds(past, seq, seed=past)
        for a, b in zip(got.run(None, feeds), want.run(None, feeds)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"past {past}, seq {seq}")
    assert not share_lengths(_layer(lengths_from_past=False), "past_length", ids="x")


def test_the_table_is_folded_at_load(tmp_path):
    model = _layer()
    rotary_into_attention(model, "past_length", positions=4096)
    optimized = tmp_path / "optimized.onnx"
    _session(model, str(optimized))
    ops = _ops(onnx.load(str(optimized)))
    assert "Cos" not in ops and "Sin" not in ops and "Range" not in ops  # nothing of it runs per call


def test_refuses_positions_or_lengths_not_from_the_past_length():
    for model in (_layer(offset=False), _layer(lengths_from_past=False)):
        assert rotary_into_attention(model, "past_length") == 0
        assert _ops(model).count("RotaryEmbedding") == 2
    model = _layer()
    assert rotary_into_attention(model, "another_length") == 0


# -- end to end: a tiny Llama whose head_dim (16) onnxruntime's rotary kernel takes ------------------------------------
@pytest.fixture(scope="module")
def rotary_llama(tmp_path_factory):
    import torch
    import transformers as T

    from memc.codegen.decode import build_decode_artifact
    from tests.helpers import _decoder_kwargs

    kwargs = {**_decoder_kwargs(), "num_attention_heads": 2, "num_key_value_heads": 1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = T.LlamaForCausalLM(T.LlamaConfig(**kwargs, tie_word_embeddings=True)).eval()
    src = tmp_path_factory.mktemp("rotary-llama")
    model.save_pretrained(src, safe_serialization=True)
    out = tmp_path_factory.mktemp("rotary-decode")
    return src, build_decode_artifact(src, out, opset=23)  # RotaryEmbedding is opset 23 (the shipped toolchain.toml)


def test_tiny_llama_decode_with_rotary_inside_attention(rotary_llama):
    from memc.codegen.decode import verify_decode
    from memc.runtime.engine import DecodeEngine, DecodeStateError
    from tests.helpers import VOCAB

    src, path = rotary_llama
    model = onnx.load(str(path), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(any(a.name == "do_rotary" and a.i == 1 for a in n.attribute) for n in gqa)
    assert "RotaryEmbedding" not in _ops(model)
    layout = json.loads(next(p.value for p in model.metadata_props if p.key == "memc.kv_cache"))
    assert layout["rotary_positions"] == ROTARY_POSITIONS
    engine = DecodeEngine(path, threads=1)
    assert engine.max_positions == ROTARY_POSITIONS
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(2, 20), dtype=np.int64)
    for prefill in (1, 9):  # prefill then one step per token, batch 2
        check = verify_decode(engine, src, ids, prefill=prefill)
        assert check.passed, check.as_dict()
    logits, state = engine.prefill(ids[:1, :6])  # a continued prompt (batch 1, 5 tokens after 6)
    more, _ = engine.forward(ids[:1, 6:11], state)
    whole, _ = engine.prefill(ids[:1, :11])
    np.testing.assert_allclose(more, whole[:, 6:], atol=1e-4)
    engine.max_seq_len, engine.max_positions = None, 8  # speed runs lift max_seq_len, never the table's length
    _, state = engine.prefill(ids[:1, :8])
    with pytest.raises(DecodeStateError, match=r"past 8 \+ 1 new token\(s\) exceeds the 8 positions of this decode "
                                               r"graph's rotary table"):
        engine.step(ids[0, 8:9], state)
