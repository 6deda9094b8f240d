"""The quantize pass and its ONNX lowering: torch program == fake-quant weights, ONNX artifact == torch program
(exact-check mode, 1e-4), predicted bytes == the bytes of the weight initializers on disk, tied weights once."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from memc.config import TargetConfig
from memc.errors import ConfigError, UnsupportedError
from memc.nn.quant_linear import QuantEmbedding, QuantLinear
from memc.passes.base import PassContext
from memc.passes.quant.quantize import PLAN, Quantize, QuantizeOptions
from memc.quant.sites import find_weights, tie_groups
from memc.targets.onnxruntime import OnnxRuntimeTarget
from tests.helpers import record_diff

MIXED = {  # every kind the onnx target stores: 2/4/8 bits, affine / symmetric, float16 / float32 scales
    "model.embed_tokens.weight": "int4-g16",
    "model.layers.0.self_attn.q_proj.weight": "int2-g16", "model.layers.0.self_attn.k_proj.weight": "int2-g16",
    "model.layers.0.self_attn.v_proj.weight": "int2-g16",
    "model.layers.0.self_attn.o_proj.weight": "int8-g32-sym",
    "model.layers.0.mlp.gate_proj.weight": "int4-g32-s32", "model.layers.0.mlp.up_proj.weight": "int4-g32-s32",
    "model.layers.0.mlp.down_proj.weight": "int4-g64-sym",
    "model.layers.1.mlp.down_proj.weight": "int2-g32",
}


def _samples(program):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 128, (2, 16), generator=gen),), (torch.randint(0, 128, (1, 9), generator=gen),)]


def test_sites_and_ties(tiny_llama_program):
    weights, fixed = find_weights(tiny_llama_program)
    names = [w.name for w in weights]
    assert names[0] == "model.embed_tokens.weight" and len(names) == 15  # tied LM head: the same tensor
    tied = next(w for w in weights if w.name == "model.embed_tokens.weight")
    assert sorted(u.kind for u in tied.uses) == ["embedding", "linear"]
    groups = {g.name: g.members for g in tie_groups(weights)}
    assert groups["model.layers.0.self_attn.{q+k+v}"] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert groups["model.layers.1.mlp.{gate+up}"] == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert len(groups) == 1 + 2 * 4
    assert fixed == 5 * 32 * 4 + 2 * 4 * 4  # 5 RMSNorm weights + rotary inv_freq / original_inv_freq (head 8)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_torch_program_equals_fake_quant(tiny_llama_program, method):
    p = tiny_llama_program
    ids = _samples(p)[0]
    ctx = PassContext(calibration=_samples(p))
    original = p.module.get_parameter("model.layers.0.mlp.up_proj.weight").detach().clone()
    out = Quantize(QuantizeOptions(format="int4-g16", method=method)).run(p, ctx)
    mods = dict(out.program.module.named_modules())
    qlin = mods["model.layers.0.mlp.up_proj.quant"]
    assert isinstance(qlin, QuantLinear) and isinstance(mods["model.embed_tokens.quant"], QuantEmbedding)
    assert mods["lm_head.quant"].qweight is mods["model.embed_tokens.quant"].qweight  # tied: one stored tensor
    assert not any("up_proj.weight" in n for n, _ in out.program.module.named_parameters())
    x = torch.randn(3, 32)
    w = qlin.qweight.dequantize()
    assert torch.equal(qlin(x), x @ w.T)
    dev = float((w - original).abs().max())
    # it did quantize: RTN within half a step; GPTQ (act-order by default) feeds errors forward, so a weight may move
    # further, but stays on its group's static grid, inside the weight's own range
    assert 0 < dev < (0.1 if method == "rtn" else float(original.abs().max()))
    assert out.program(*ids)[0].shape == (2, 16, 128)


def _initializer_bytes(path, ops=("MatMulNBits", "GatherBlockQuantized")):
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o: n for n in model.graph.node for o in n.output}

    def source(name):  # follow Cast / Reshape back to the stored initializer
        while name not in inits and name in produced and produced[name].op_type in ("Cast", "Reshape"):
            name = produced[name].input[0]
        return name

    names = {source(i) for n in model.graph.node if n.op_type in ops for i in list(n.input)[1:] if i}
    names = {n for n in names if n in inits and numpy_helper.to_array(inits[n]).ndim >= 2}  # codes/scales/zeros
    return sum(numpy_helper.to_array(inits[n]).nbytes for n in names), model


def test_onnx_matches_torch_and_bytes_on_disk(tiny_llama_program, tmp_path):
    p = tiny_llama_program
    p.annotations[PLAN] = MIXED
    result = Quantize(QuantizeOptions()).run(p, PassContext())
    program = result.program
    target = OnnxRuntimeTarget(TargetConfig())
    target.check(program)
    target.build(program, tmp_path)
    v = target.verify(program, tmp_path, _samples(program))
    record_diff("quantize mixed plan: onnx vs torch", v.worst["logits"])
    assert v.passed and v.worst["logits"] <= 1e-4
    on_disk, model = _initializer_bytes(tmp_path / "model.onnx")
    assert on_disk == result.metrics["quantized_bytes"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    # the tied table: 1 gather + the LM-head matmul; layer 0's q|k|v and gate|up are packed (memc.codegen.fusion)
    assert ops.count("MatMulNBits") == len(MIXED) - 2 - 1
    mm = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    produced = {o: n for n in model.graph.node for o in n.output}
    lm_head = next(n for n in mm if n.output[0] == "logits")
    assert produced[gather.input[0]].input[0] == lm_head.input[1]  # one stored table for embedding and LM head


def test_target_refuses_unstorable_format(tiny_llama_program):
    p = tiny_llama_program
    p.annotations[PLAN] = {"model.layers.1.mlp.up_proj.weight": "int3-g16", "model.layers.1.mlp.gate_proj.weight": "int3-g16"}
    program = Quantize(QuantizeOptions()).run(p, PassContext()).program
    program(*_samples(p)[0])  # the torch program still runs
    with pytest.raises(UnsupportedError, match=r"'model.layers.1.mlp.gate_proj.weight'.*'int3-g16'.*onnx"):
        OnnxRuntimeTarget(TargetConfig()).check(program)


def test_no_format_is_a_clear_error(tiny_llama_program):
    with pytest.raises(ConfigError, match="no format"):
        Quantize(QuantizeOptions()).run(tiny_llama_program, PassContext())
    with pytest.raises(ValueError, match="unknown format"):
        QuantizeOptions(format="int4g128").validate()


def test_quantized_graph_gets_the_fp32_graphs_fusions(tiny_llama_program, tmp_path):
    """MatMulNBits / GatherBlockQuantized outputs are sized for the fusion rules: the quantized artifact has the fp32
    artifact's skip norms and 3-D rotary (no head Transposes left), not the unfused Add + RMSNormalization pairs."""
    target = OnnxRuntimeTarget(TargetConfig())
    for d in ("fp32", "q"):
        (tmp_path / d).mkdir()
    target.build(tiny_llama_program, tmp_path / "fp32")
    plan = {w.name: "int4-g16" for w in find_weights(tiny_llama_program)[0]}
    p = tiny_llama_program.replace(module=copy.deepcopy(tiny_llama_program.module),
                                   annotations={**tiny_llama_program.annotations, PLAN: plan})
    program = Quantize(QuantizeOptions()).run(p, PassContext()).program
    OnnxRuntimeTarget(TargetConfig()).build(program, tmp_path / "q")  # a target caches its program's export
    fp32, quant = ([n.op_type for n in onnx.load(str(tmp_path / d / "model.onnx")).graph.node] for d in ("fp32", "q"))
    assert fp32.count("SkipSimplifiedLayerNormalization") > 0 and quant.count("MatMulNBits") == 15 - 2 * 3
    for op in ("SkipSimplifiedLayerNormalization", "RMSNormalization", "RotaryEmbedding", "Transpose", "Split",
               "GroupQueryAttention"):
        assert quant.count(op) == fp32.count(op), op


def test_packed_siblings_match_the_unpacked_graph(tiny_llama_program, tmp_path, monkeypatch):
    """Same-format q|k|v and gate|up MatMulNBits packed into one each: the artifact stores the same tensor bytes
    (the graph a little smaller), computes what the unpacked artifact computes (level 0, 1e-5) and still matches the torch
    program in exact-check mode; siblings of different formats (layer 1's fp32 q / k / v) are left to their own rule."""
    import memc.codegen.fusion as fusion
    from benchmarks.harness import ort_session

    p = tiny_llama_program
    p.annotations[PLAN] = {**MIXED, "model.layers.1.mlp.gate_proj.weight": "int8-g32-sym",
                           "model.layers.1.mlp.up_proj.weight": "int8-g32-sym"}
    program = Quantize(QuantizeOptions()).run(p, PassContext()).program
    built = {}
    for name in ("packed", "unpacked"):
        if name == "unpacked":
            monkeypatch.setattr(fusion, "pack_matmul_nbits", lambda model: 0)
        target = OnnxRuntimeTarget(TargetConfig())
        (tmp_path / name).mkdir()
        target.build(program, tmp_path / name)
        v = target.verify(program, tmp_path / name, _samples(program))
        assert v.passed and v.worst["logits"] <= 1e-4
        built[name] = tmp_path / name / "model.onnx"
    ops = {k: [n.op_type for n in onnx.load(str(v)).graph.node] for k, v in built.items()}
    assert ops["unpacked"].count("MatMulNBits") == 11 and ops["packed"].count("MatMulNBits") == 11 - 2 - 1 - 1
    assert ops["packed"].count("Split") == ops["unpacked"].count("Split") + 3
    assert _initializer_bytes(built["packed"])[0] == _initializer_bytes(built["unpacked"])[0]
    size = {k: v.stat().st_size for k, v in built.items()}
    assert size["packed"] < size["unpacked"]  # graph bytes only: fewer nodes, initializer names and Casts
    for ids in _samples(program):
        feeds = {"input_ids": ids[0].numpy()}
        got, want = (ort_session(built[k]).run(None, feeds)[0] for k in ("packed", "unpacked"))
        record_diff("packed vs unpacked MatMulNBits (level 0)", float(np.abs(got - want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_accuracy_level_per_format(tiny_llama_program):
    """accuracy_level -1: each QuantLinear gets the level memc.quant.speed measured fastest for its format."""
    p = tiny_llama_program
    p.annotations[PLAN] = {**MIXED, "model.layers.1.mlp.down_proj.weight": "int2-g128"}
    program = Quantize(QuantizeOptions(accuracy_level=-1)).run(p, PassContext()).program
    levels = {m.qweight.fmt.name: m.accuracy_level for m in program.module.modules() if isinstance(m, QuantLinear)}
    assert levels == {"int2-g16": 4, "int8-g32-sym": 4, "int4-g32-s32": 4, "int4-g64-sym": 4, "int2-g128": 0,
                      "int4-g16": 4}
    with pytest.raises(ValueError, match="accuracy_level"):
        QuantizeOptions(accuracy_level=5).validate()
