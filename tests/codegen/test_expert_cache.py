"""The expert-cache form of a compiled MoE program: what is written, that it carries the passes, and refusals.

The session's compile (tiny Qwen3-MoE: 2 layers, 4 experts, top-2; ``target.expert_cache.slots = 2``) writes
model.onnx and expert_cache/. Checks: no segment holds expert weights (the store does, one record per expert,
equal to the program's tensors), the report records the layout and the verification, and a pruned program's
cache form computes the pruned model (not the source). Bad input fails before anything is written.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import memc.passes.builtin  # noqa: F401  (registers the passes)
from memc.calibration import calibration_samples
from memc.codegen.decode import program_reference
from memc.codegen.expert_cache import build_expert_cache, check_expert_cache
from memc.config import parse_config
from memc.errors import ConfigError, UnsupportedError
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from memc.passes.moe.detect import find_moe_sites
from memc.passes.moe.graph import get_attr_tensor
from memc.runtime.engine import decode_logits
from memc.runtime.expert_cache import ExpertCacheEngine
from tests.helpers import captured, DEFAULT_ATOL, VOCAB, compile_model, record_diff

SLOTS = ("--set", "target.expert_cache.slots=2")


@pytest.fixture(scope="session")
def cache_compiled(compiled, tiny_hf):
    result = compiled(tiny_hf("qwen3-moe"), *SLOTS)
    assert result.rc == 0, result.explain()
    return result


def _ids(batch: int, seq: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def test_layout_report_and_store(cache_compiled, tiny_hf):
    out, report = cache_compiled.out_dir, cache_compiled.report
    layout = report["target"]["expert_cache"]
    assert layout["slots"] == 2 and layout["layers"] == 2 and layout["experts"] == [4, 4]
    assert [s["file"] for s in layout["segments"]] == ["segment_0.onnx", "segment_1.onnx", "segment_2.onnx"]
    paths = {a["path"] for a in report["target"]["artifacts"]}
    assert {"expert_cache/experts.bin", "expert_cache/expert_cache.json", "expert_cache/segment_2.onnx"} <= paths
    checks = [s for s in report["verification"]["samples"] if "expert_cache.logits" in s["max_abs_diff"]]
    assert checks and all(s["max_abs_diff"]["expert_cache.logits"] <= DEFAULT_ATOL for s in checks)

    program = captured(tiny_hf("qwen3-moe"))
    sites = find_moe_sites(program.module)
    expert_bytes = sum(s.expert_bytes for s in sites)
    segments = [onnx.load(str(out / "expert_cache" / s["file"])) for s in layout["segments"]]
    seg_bytes = sum(numpy_helper.to_array(t).nbytes for m in segments for t in m.graph.initializer)
    params = program.parameter_stats()[1]
    # the segments hold every weight but the experts' (within the exporter's few small constants), once
    assert abs(seg_bytes - (params - expert_bytes)) < 0.05 * (params - expert_bytes), (seg_bytes, params, expert_bytes)
    shapes = {tuple(get_attr_tensor(program.module, p).shape) for s in sites for p in s.expert_params}
    assert not [t.name for m in segments for t in m.graph.initializer if tuple(t.dims) in shapes]
    engine = ExpertCacheEngine(out)
    for site, layer in zip(sites, engine.layers):  # record e of the store is expert e of every expert tensor
        for param, view in zip(site.expert_params, layer.store):
            np.testing.assert_array_equal(view, get_attr_tensor(program.module, param).detach().numpy())
    stats = engine.stats()
    assert stats["bytes_resident"] == stats["bytes_full"] - expert_bytes // 2  # 2 of 4 experts per layer resident
    manifest = json.loads((out / "expert_cache" / "expert_cache.json").read_text())
    assert manifest["store"]["bytes"] == (out / "expert_cache" / "experts.bin").stat().st_size >= expert_bytes


def test_cache_form_equals_the_program_and_model_onnx(cache_compiled, tiny_hf):
    """Prefill (tokens grouped: C = k cannot hold a long prompt's experts at once) + steps, at C = k, E/2 + 1, E."""
    from memc.runtime.artifact import load

    program = captured(tiny_hf("qwen3-moe"))
    ids = _ids(2, 24)
    want = program_reference(program)(ids)
    (full,) = load(cache_compiled.out_dir).run(ids)
    for slots in (2, 3, 4):
        engine = ExpertCacheEngine(cache_compiled.out_dir, slots=slots, trace=True)
        got = decode_logits(engine, ids, 16)
        diff, vs_onnx = float(np.abs(got - want).max()), float(np.abs(got - full).max())
        record_diff(f"expert cache {slots} slots vs program", diff)
        assert diff <= DEFAULT_ATOL and vs_onnx <= DEFAULT_ATOL, (slots, diff, vs_onnx)
        if slots == 2:  # the prefill's 32 tokens needed more than 2 experts: they ran in several groups
            from memc.runtime.expert_slots import token_groups

            assert len(token_groups(engine.trace[0][0], 2)) > 1
            assert engine.stats()["loads"] > 4


def test_a_pruned_program_deploys_pruned(tiny_hf, tmp_path):
    """Built from the Program after prune-experts (3 of 4 experts kept): equals the pruned program, not the source."""
    model = str(tiny_hf("qwen3-moe"))
    cfg = parse_config({"calibration": {"num_samples": 2}})
    original, program = captured(model, cfg), captured(model, cfg)
    ctx = PassContext(seed=0, calibration=calibration_samples(program, cfg.calibration, cfg.inputs, 0), config=cfg)
    passes = [create_pass(n, o, f"pipeline[{i}]") for i, (n, o) in enumerate(
        [("detect-moe", {}), ("moe-calibrate", {"text": "samples"}), ("prune-experts", {"keep": 3})])]
    program = PassManager(passes).run(program, ctx)
    layout = build_expert_cache(program, tmp_path, 2, opset=18)
    assert layout["experts"] == [3, 3]
    engine = ExpertCacheEngine(tmp_path)
    ids = _ids(1, 12, seed=5)
    got = decode_logits(engine, ids, 6)
    assert float(np.abs(got - program_reference(program)(ids)).max()) <= DEFAULT_ATOL
    assert float(np.abs(got - program_reference(original)(ids)).max()) > 1e-3


def test_deepseek_v3_gates_read_the_true_ids(tiny_hf, tmp_path):
    """DeepSeek-V3 gathers its gate weights from the sigmoid scores at the top-k ids inside the experts part: that
    gather must keep the true ids while the expert gathers read slots (a dense first layer and a shared expert too)."""
    program = captured(tiny_hf("deepseek-v3"))
    layout = build_expert_cache(program, tmp_path, 2, opset=18)
    assert layout["experts"] == [8] and "ids" in layout["experts_graphs"][0]["inputs"]
    ids = _ids(2, 14, seed=7)
    got = decode_logits(ExpertCacheEngine(tmp_path), ids, 7)
    assert float(np.abs(got - program_reference(program)(ids)).max()) <= DEFAULT_ATOL


def test_refusals_name_the_key_and_the_site(tiny_hf, tiny_llama_dir):
    moe = captured(tiny_hf("qwen3-moe"))
    for slots in (1, 5):
        with pytest.raises(ConfigError, match=r"target\.expert_cache\.slots: .* model\.layers\.0\.mlp .* 2\.\.4"):
            check_expert_cache(moe, slots)
    with pytest.raises(UnsupportedError, match=r"target\.expert_cache\.slots: .* has no MoE layer"):
        check_expert_cache(captured(tiny_llama_dir), 2)
    from memc.capture.loaders import capture as cap

    handwritten = cap("tests.fixtures.moe:loop_moe_model", parse_config({}))
    with pytest.raises(UnsupportedError, match=r"MoE site moes\.0 \(layer 0\) keeps its experts in a ModuleList"):
        check_expert_cache(handwritten, 2)


@pytest.mark.parametrize("args,message", [
    (("--set", "target.expert_cache.slots=9"), "target.expert_cache.slots: 9 slots for MoE site model.layers.0.mlp"),
    (("--set", "target.expert_cache.slots=-1"), "slots must be >= 0"),
    (("--set", "target.expert_cache.slotz=2"), "target.expert_cache.slotz: unknown key"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tiny_hf, tmp_path, args, message):
    out = tmp_path / "out"
    result = compile_model(tiny_hf("qwen3-moe"), out, *args)
    assert result.rc == 2 and message in result.stderr, result.explain()
    assert "Traceback" not in result.stderr and not out.exists()


def test_cli_model_without_moe_exits_2(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = compile_model(tiny_llama_dir, out, *SLOTS)
    assert result.rc == 2 and "has no MoE layer" in result.stderr, result.explain()
    assert not out.exists()
