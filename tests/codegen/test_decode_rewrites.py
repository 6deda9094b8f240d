"""A decode graph carries every landed rewrite of its Program: quantized linears and pruned experts.

Each test rewrites a tiny model with the pass, lowers the REWRITTEN Program's decode form and checks it three
ways: it matches the rewritten Program (prefill + steps, greedy tokens) within the target tolerance, it does not
match the original model (so the comparison could fail), and the rewrite is visible in the graph itself
(MatMulNBits nodes; the pruned expert bytes gone from its initializers).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import memc.passes.builtin  # noqa: F401  (registers the passes)
from memc.calibration import calibration_samples
from memc.codegen.decode import build_decode_artifact, greedy_check, program_reference, verify_decode
from memc.config import parse_config
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from memc.runtime.engine import DecodeEngine
from tests.helpers import captured, DEFAULT_ATOL, VOCAB, record_diff


def _ids(batch: int, seq: int, seed: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def _rewrite(model_dir, pipeline: list[tuple[str, dict]]):
    cfg = parse_config({"calibration": {"num_samples": 2}})
    original = captured(str(model_dir), cfg)
    program = captured(str(model_dir), cfg)
    ctx = PassContext(seed=0, calibration=calibration_samples(program, cfg.calibration, cfg.inputs, 0), config=cfg)
    passes = [create_pass(name, options, f"pipeline[{i}]") for i, (name, options) in enumerate(pipeline)]
    return original, PassManager(passes).run(program, ctx)


def _check_carries_the_rewrite(original, rewritten, out_dir, label: str) -> tuple[onnx.ModelProto, DecodeEngine]:
    path = build_decode_artifact(rewritten, out_dir, 18)
    engine = DecodeEngine(path)
    ids = _ids(2, 16)
    check = verify_decode(engine, program_reference(rewritten), ids, prefill=6, atol=DEFAULT_ATOL)
    assert check.passed, check.as_dict()
    record_diff(f"decode {label} vs the rewritten program", check.max_abs_diff)
    against_source = verify_decode(engine, program_reference(original), ids, prefill=6, atol=DEFAULT_ATOL)
    assert against_source.max_abs_diff > 1e-3, "the decode graph computes the source model, not its rewrite"
    greedy = greedy_check(engine, program_reference(rewritten), ids[:1, :5], 12)
    assert greedy.equal and greedy.max_abs_diff <= DEFAULT_ATOL, greedy.as_dict()
    return onnx.load(str(path)), engine


def test_quantized_linears(tiny_llama_dir, tmp_path):
    original, quantized = _rewrite(tiny_llama_dir, [("quantize", {"format": "int4-g16"})])
    model, _ = _check_carries_the_rewrite(original, quantized, tmp_path, "int4 llama")
    ops = [n.op_type for n in model.graph.node]
    # q|k|v, o, gate|up, down per layer (2 layers; same-format siblings packed, memc.codegen.fusion) + the LM head
    assert ops.count("MatMulNBits") == 2 * 4 + 1, sorted(set(ops))


def test_pruned_experts(tiny_hf, tmp_path):
    original, pruned = _rewrite(tiny_hf("qwen3-moe"), [
        ("detect-moe", {}), ("moe-calibrate", {"text": "samples"}), ("prune-experts", {"keep": 2}),
    ])
    freed = pruned.log[-1].metrics["bytes_freed"]
    assert pruned.log[-1].metrics["experts_after"] == [2, 2] and freed > 0
    model, engine = _check_carries_the_rewrite(original, pruned, tmp_path, "pruned qwen3-moe")
    weights = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    unpruned = original.parameter_stats()[1]
    assert weights <= unpruned - 0.9 * freed, (weights, unpruned, freed)  # the dropped experts are not in the graph
    # batch rows route to different experts: each row of a batched decode equals that row decoded alone
    prompt = _ids(3, 5, seed=9)
    batched = engine.generate(prompt, 6)
    for row in range(3):
        np.testing.assert_array_equal(batched[row], engine.generate(prompt[row], 6))
