"""Decode graphs lowered from the Program after its passes (memc.codegen.decode_rewrite), not from the source model.

KV: the tiny Llama's Program in step form, prefill + single-token steps through the engine == the Program's
full-sequence logits. Memory caching: the tiny Llama rewritten by detect-attention + memory-caching (window 4,
segment 4, max_segments 2: segments close, fill the cap and merge within 24 tokens) compiled with
``decode_graph = true``; its decode graph is fed token by token and must match the REWRITTEN Program (rebuilt
here with the same seed), its state inputs have no context-dependent axis, and an unbounded layer is refused at
check time naming the site. The select variant (window 4, segment 4, keep 1, max_tokens 2: the pool fills and
evicts within 24 tokens) the same way, its uncapped form refused naming max_tokens. One decode export per model
(the machine is slow; fixtures are shared).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import memc.passes.builtin  # noqa: F401  (registers the passes)
from memc.codegen.decode import greedy_check, program_reference, verify_decode
from memc.codegen.decode_rewrite import check_decodable, decode_graph
from memc.config import ToolchainConfig
from memc.errors import UnsupportedError
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from memc.runtime.engine import DecodeEngine
from tests.helpers import captured, DEFAULT_ATOL, LAYERS, VOCAB, compile_model, onnx_input_dims, record_diff, write_toml

from tests.helpers import MC_OPTIONS as MC  # the options of the session's mc_compiled fixture (conftest)


def _ids(batch: int, seq: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def _mc_program(model_dir, **options):
    program = captured(model_dir)
    passes = [create_pass("detect-attention", {}, "pipeline[0]"),
              create_pass("memory-caching", {**MC, **options}, "pipeline[1]")]
    return PassManager(passes).run(program, PassContext(seed=ToolchainConfig().seed))


def test_kv_decode_from_the_program_matches_full_logits(tiny_hf, decode_artifact):
    """The KV artifact (built from the captured Program) vs that Program: prefill 8 + 8 steps, batch 2."""
    program = captured(tiny_hf("llama"))
    engine = DecodeEngine(decode_artifact("llama"))
    check = verify_decode(engine, program_reference(program), _ids(2, 16), prefill=8, atol=DEFAULT_ATOL)
    assert check.steps == 8 and check.passed, check.as_dict()
    record_diff("decode llama from the Program", check.max_abs_diff)
    assert greedy_check(engine, program_reference(program), _ids(1, 6), 8).equal


def test_kv_rewrite_structure_preallocated(tiny_hf):
    """Before: one sdpa per layer over the repeated k/v. Expected (GroupQueryAttention lowering): past_length plus
    two buffer placeholders per layer, one memc::cached_attention per layer on the k/v heads before the repeat,
    positions offset by past_length; logits + the updated buffers out."""
    program = captured(tiny_hf("llama"))
    graph = decode_graph(program, "gqa")
    nodes = list(graph.module.graph.nodes)
    placeholders = [n.name for n in nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "past_length",
                            *[f"past_{k}_{i}" for i in range(LAYERS) for k in ("key", "value")]]
    assert sum(n.target is torch.ops.memc.cached_attention.default for n in nodes) == LAYERS
    assert not any(n.target is torch.ops.aten.cat.default and n.args[1] == 2 for n in nodes)  # no KV concat
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in nodes)
    assert graph.kv_layout == "preallocated" and graph.state[0].shape == ("batch", 2, "capacity", 8)
    # torch check of the rewrite alone: 7-token prefill into empty buffers of 16, then 5 tokens after it
    ids = torch.from_numpy(_ids(2, 12))
    empty = [torch.zeros(2, 2, 16, 8) for _ in range(2 * LAYERS)]
    with torch.no_grad():
        first = graph.module(ids[:, :7], torch.tensor(0), *empty)
        second = graph.module(ids[:, 7:], torch.tensor(7), *first[1:])
    full = program(ids)[0]
    assert torch.allclose(torch.cat([first[0], second[0]], 1), full, atol=1e-5)


def test_kv_standard_layout_decodes_exactly(tiny_hf, tmp_path):
    """The standard lowering (onnxruntime versions without a measured GroupQueryAttention choice): a growing KV
    cache by Concat, opset-23 Attention; through the engine it matches the Program as the preallocated one does."""
    from memc.codegen.decode import build_decode_artifact

    program = captured(tiny_hf("llama"))
    path = build_decode_artifact(program, tmp_path, 23, attention="standard")
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert "Attention" in ops and "GroupQueryAttention" not in ops
    engine = DecodeEngine(path)
    assert engine.kv_layout == "concat" and engine.length_input is None
    check = verify_decode(engine, program_reference(program), _ids(2, 16), prefill=8, atol=DEFAULT_ATOL)
    assert check.passed, check.as_dict()
    record_diff("decode llama standard layout", check.max_abs_diff)


def test_kv_rewrite_structure(tiny_hf):
    """The standard (concat) layout. Before: one sdpa per layer over the repeated k/v. Expected: per layer two state
    placeholders, two concats (the presents) feeding one causal attention, positions offset by the past length;
    logits + presents out."""
    program = captured(tiny_hf("llama"))
    graph = decode_graph(program, "standard")
    nodes = list(graph.module.graph.nodes)
    placeholders = [n.name for n in nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", *[f"past_{k}_{i}" for i in range(LAYERS) for k in ("key", "value")]]
    assert sum(n.target is torch.ops.aten.cat.default and n.args[1] == 2 for n in nodes) == 2 * LAYERS
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in nodes)
    assert [s["kind"] for s in graph.sites] == ["kv"] * LAYERS and graph.seq_dynamic
    # torch check of the rewrite alone, past > 0: 5 tokens after a 7-token prefill
    ids = torch.from_numpy(_ids(2, 12))
    empty = [torch.zeros(2, 2, 0, 8) for _ in range(2 * LAYERS)]
    with torch.no_grad():
        first = graph.module(ids[:, :7], *empty)
        second = graph.module(ids[:, 7:], *first[1:])
    full = program(ids)[0]
    assert torch.allclose(torch.cat([first[0], second[0]], 1), full, atol=1e-5)


def test_mc_decode_matches_the_rewritten_program(tiny_hf, mc_compiled):
    program = _mc_program(tiny_hf("llama"))
    engine = DecodeEngine(mc_compiled.out_dir)
    assert engine.single_token and engine.max_seq_len is None  # bounded state: no context limit of its own
    ids = _ids(2, 24)
    reference = program_reference(program)
    check = verify_decode(engine, reference, ids, prefill=1, atol=DEFAULT_ATOL)
    assert check.steps == 23 and check.passed, check.as_dict()
    record_diff("decode llama memory-caching", check.max_abs_diff)
    # not vacuous: the memory matters here (window-only logits differ), so the state carries information
    with_memory = reference(ids)
    for mod in program.module.modules():
        if type(mod).__name__ == "MemoryCachingAttention":
            mod.memory_enabled = False
    window_only = reference(ids)
    assert np.abs(window_only[:, 8:] - with_memory[:, 8:]).max() > 1e-3
    report = mc_compiled.report
    greedy = report["verification"]["decode"]["greedy"]
    assert greedy["equal"] is True and greedy["steps"] == 16
    # prefill + 16 steps of logits along the greedy path, counted in the decode.logits worst case
    assert 0 < greedy["max_abs_diff"] <= DEFAULT_ATOL
    modes = [s["mode"] for s in report["verification"]["samples"]]
    assert f"decode: prefill {greedy['prompt']} + 16 steps along the greedy path" in modes
    assert report["verification"]["max_abs_diff"]["decode.logits"] <= DEFAULT_ATOL


def test_mc_state_has_no_context_dimension(mc_compiled):
    path = mc_compiled.out_dir / "decode.onnx"
    dims = onnx_input_dims(path)
    assert dims["input_ids"] == ["batch", 1]
    state = [n for n in dims if n != "input_ids"]
    assert len(state) == 11 * LAYERS and state[0] == "past_mc_t_0"
    for name in state:
        assert all(isinstance(d, int) for d in dims[name][1:]) and dims[name][:1] in ([], ["batch"]), (name, dims[name])
    # the layout in report.json == the graph's metadata == what the engine reads
    layout = mc_compiled.report["target"]["decode"]["state"]
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["memc.state"]) == layout["tensors"]
    assert [t["name"] for t in layout["tensors"]] == state and layout["seq"] == 1
    assert {t["kind"] for t in layout["tensors"]} == {"mc"}
    engine = DecodeEngine(path)
    sizes = []
    state_arrays = engine.empty_state(1)
    for n in (8, 24):
        _, state_arrays = engine.prefill(_ids(1, n))
        sizes.append(engine.state_bytes(state_arrays))
    assert sizes[0] == sizes[1] > 0


def test_unbounded_mc_layer_is_refused_at_check_time(tiny_hf):
    program = _mc_program(tiny_hf("llama"), max_segments=0)
    with pytest.raises(UnsupportedError, match=r"attention site model\.layers\.0\.self_attn: .*unbounded "
                                               r"\(max_segments = 0\)") as info:
        check_decodable(program)
    assert "max_segments > 0" in info.value.hint


def test_compile_refuses_an_unbounded_mc_decode_graph(tiny_hf, tmp_path):
    cfg = write_toml(tmp_path / "toolchain.toml", """
        [[pipeline]]
        pass = "detect-attention"

        [[pipeline]]
        pass = "memory-caching"
        window = 4
        segment = 4

        [target]
        decode_graph = true
    """)
    res = compile_model(tiny_hf("llama"), tmp_path / "out", "-c", cfg)
    assert res.rc == 2, res.explain()
    assert "model.layers.0.self_attn" in res.stderr and "max_segments" in res.stderr
    assert "Traceback" not in res.stderr
    assert not res.out_dir.exists()


def test_mixed_kv_and_mc_sites_decode_exactly(tiny_hf, tmp_path):
    """Layer 0 memory caching, layer 1 plain: one graph with past_length, the KV buffers (in place) and the
    memory-caching state (its 0-d token counter included), fed token by token; it matches the rewritten Program."""
    from memc.codegen.decode import build_decode_artifact

    program = _mc_program(tiny_hf("llama"), sites=["model.layers.0.*"])
    engine = DecodeEngine(build_decode_artifact(program, tmp_path, 23))
    kinds = {s.kind for s in engine.state_specs}
    assert engine.kv_layout == "preallocated" and engine.single_token and kinds == {"kv", "mc"}
    check = verify_decode(engine, program_reference(program), _ids(2, 20), prefill=1, atol=DEFAULT_ATOL)
    assert check.passed, check.as_dict()
    record_diff("decode llama mixed kv + memory-caching", check.max_abs_diff)


SELECT = {"variant": "select", "window": 4, "segment": 4, "keep": 1, "max_tokens": 2}  # 24 tokens: 4 segments close


def test_unbounded_select_layer_is_refused_at_check_time(tiny_hf):
    """Every site a select layer with no cap: refused naming the site and max_tokens (not "no attention site")."""
    program = _mc_program(tiny_hf("llama"), **{**SELECT, "max_tokens": 0})
    with pytest.raises(UnsupportedError, match=r"attention site model\.layers\.0\.self_attn: .*select.*unbounded "
                                               r"\(max_tokens = 0\)") as info:
        check_decodable(program)
    assert "max_tokens > 0" in info.value.hint


def test_select_decode_compiles_and_matches_the_rewritten_program(tiny_hf, tmp_path):
    """The tiny Llama rewritten with the capped select variant, compiled with decode_graph = true: memc compile's own
    decode verification (prefill + steps and greedy tokens vs the Program) passes; the state is kind mc, named
    past_sel_*, with no context axis; the engine fed token by token matches the rewritten Program, where the pool
    matters (window-only logits differ)."""
    options = "".join(f'{k} = {json.dumps(v)}\n' for k, v in SELECT.items())
    cfg = write_toml(tmp_path / "toolchain.toml", '[[pipeline]]\npass = "detect-attention"\n\n[[pipeline]]\n'
                     f'pass = "memory-caching"\n{options}\n[target]\ndecode_graph = true\ndecode_steps = 16\n')
    res = compile_model(tiny_hf("llama"), tmp_path / "out", "-c", cfg)
    assert res.rc == 0, res.explain()
    verification = res.report["verification"]
    greedy = verification["decode"]["greedy"]
    assert greedy["equal"] is True and greedy["steps"] == 16
    assert verification["max_abs_diff"]["decode.logits"] <= DEFAULT_ATOL
    layout = res.report["target"]["decode"]["state"]
    assert [s["kind"] for s in layout["sites"]] == ["select"] * LAYERS and layout["seq"] == 1
    assert {t["kind"] for t in layout["tensors"]} == {"mc"} and layout["tensors"][0]["name"] == "past_sel_t_0"
    dims = onnx_input_dims(res.out_dir / "decode.onnx")
    for name in (n for n in dims if n != "input_ids"):
        assert all(isinstance(d, int) for d in dims[name][1:]), (name, dims[name])

    program = _mc_program(tiny_hf("llama"), **SELECT)  # the same seed: the same scorers as the compiled one
    engine = DecodeEngine(res.out_dir)
    assert engine.single_token and engine.max_seq_len is None
    ids = _ids(2, 24)
    reference = program_reference(program)
    check = verify_decode(engine, reference, ids, prefill=1, atol=DEFAULT_ATOL)
    assert check.steps == 23 and check.passed, check.as_dict()
    record_diff("decode llama select", check.max_abs_diff)
    sizes = [engine.state_bytes(engine.prefill(_ids(1, n))[1]) for n in (8, 24)]
    assert sizes[0] == sizes[1] > 0
    with_memory = reference(ids)
    for mod in program.module.modules():
        if type(mod).__name__ == "SelectiveMemoryAttention":
            mod.memory_enabled = False
    assert np.abs(reference(ids)[:, 8:] - with_memory[:, 8:]).max() > 1e-3


def test_compile_refuses_an_uncapped_select_decode_graph(tiny_hf, tmp_path):
    cfg = write_toml(tmp_path / "toolchain.toml", """
        [[pipeline]]
        pass = "detect-attention"

        [[pipeline]]
        pass = "memory-caching"
        variant = "select"
        window = 4
        segment = 4

        [target]
        decode_graph = true
    """)
    res = compile_model(tiny_hf("llama"), tmp_path / "out", "-c", cfg)
    assert res.rc == 2, res.explain()
    assert "model.layers.0.self_attn" in res.stderr and "max_tokens" in res.stderr
    assert "no attention site" not in res.stderr and "Traceback" not in res.stderr
    assert not res.out_dir.exists()
