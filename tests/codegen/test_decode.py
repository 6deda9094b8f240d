"""The stateful decode graph (memc.codegen.decode): one ONNX graph with explicit KV state in and out.

Artifacts are built from the captured Program (build_decode_artifact captures the directory as memc compile does,
then lowers the Program's step form). For each family the artifact is run through memc's DecodeEngine as a prefill plus single-token steps, and the
concatenated logits are compared with ONE forward of the original transformers model over the whole sequence
(no cache), loaded independently of memc. Run with ``-s`` to see ``decode FAMILY max|Δ|=...`` lines.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from memc.codegen.decode import DecodeCheck, build_decode_artifact, decode_graph, program_of, verify_decode
from memc.errors import UnsupportedError
from memc.runtime.engine import DecodeEngine
from tests.helpers import (
    DEFAULT_ATOL,
    LAYERS,
    MAX_POS,
    VOCAB,
    compile_model,
    load_hf_original,
    onnx_input_dims,
    record_diff,
    write_toml,
)

FAMILIES = ["llama", "qwen2", "mixtral", "qwen2-moe", "gpt2"]


def _ids(batch: int, seq: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def _check(engine, model, ids, prefill) -> DecodeCheck:
    check = verify_decode(engine, model, ids, prefill=prefill, atol=DEFAULT_ATOL)
    assert check.steps == ids.shape[1] - prefill and check.prefill == prefill
    return check


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_plus_steps_equal_full_forward(name, tiny_hf, decode_artifact):
    """Batch 2: prefill 10 then 14 steps, and prefill 1 then 23 steps (every position through the step path)."""
    model = load_hf_original(tiny_hf(name))
    engine = DecodeEngine(decode_artifact(name))
    ids = _ids(2, 24)
    worst = 0.0
    for prefill in (10, 1):
        check = _check(engine, model, ids, prefill)
        assert check.passed, f"{name}: {check.as_dict()}"
        worst = max(worst, check.max_abs_diff)
    record_diff(f"decode {name}", worst)


def test_long_sequence_up_to_the_maximum_length(tiny_hf, decode_artifact):
    """Positions stay right up to max_position_embeddings (RoPE offsets come from the past length)."""
    model = load_hf_original(tiny_hf("llama"))
    check = _check(DecodeEngine(decode_artifact("llama")), model, _ids(1, MAX_POS, seed=3), MAX_POS - 8)
    assert check.passed, check.as_dict()


def test_opset_23_native_ops_with_zero_length_past(tiny_hf, decode_artifact):
    """Opset 23 (this onnxruntime): GroupQueryAttention over the preallocated cache, 3-D RotaryEmbedding (the
    peephole removed the head transposes around it); prefill writes into an empty buffer."""
    path = decode_artifact("llama", 23)
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    ops = set(nodes)
    assert {"GroupQueryAttention", "RotaryEmbedding"} <= ops and "Attention" not in ops and "Transpose" not in ops
    # onnxruntime fusions (memc.codegen.fusion): q / k / v and gate / up packed per layer, residual adds + norms fused
    assert nodes.count("Split") == 2 * LAYERS and nodes.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS
    check = _check(DecodeEngine(path), load_hf_original(tiny_hf("llama")), _ids(2, 16), 8)
    assert check.passed, check.as_dict()
    record_diff("decode llama opset 23", check.max_abs_diff)


def test_qwen3_moe_reference_architecture(tmp_path):
    """Qwen3-MoE (the reference MoE's architecture: q/k norms, 16-way routing here 4-way) decodes exactly too."""
    import transformers as T

    cfg = T.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=MAX_POS, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T.Qwen3MoeForCausalLM(cfg).eval().save_pretrained(tmp_path / "model")
    path = build_decode_artifact(tmp_path / "model", tmp_path / "out")
    check = _check(DecodeEngine(path), load_hf_original(tmp_path / "model", moe=True), _ids(2, 16), 6)
    assert check.passed, check.as_dict()
    record_diff("decode qwen3-moe", check.max_abs_diff)


def test_graph_interface(decode_artifact):
    """Names, dynamic axes and metadata a runtime can rely on."""
    path = decode_artifact("llama")
    dims = onnx_input_dims(path)
    state = [f"past_{k}_{i}" for i in range(LAYERS) for k in ("key", "value")]
    assert list(dims) == ["input_ids", "past_length", *state]  # preallocated KV buffers + their fill length
    assert dims["input_ids"] == ["batch", "seq"] and dims["past_length"] == []
    for name in state:
        assert dims[name] == ["batch", 2, "capacity", 8]  # 2 KV heads (GQA), head_dim 32 / 4
    model = onnx.load(str(path), load_external_data=False)
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert list(outputs) == ["logits", *(n.replace("past_", "present_") for n in state)]
    assert outputs["logits"] == ["batch", "seq", VOCAB]
    assert outputs["present_key_0"] == ["batch", 2, "capacity", 8]  # same buffer, written in place
    meta = {p.key: p.value for p in model.metadata_props}
    kv = json.loads(meta["memc.kv_cache"])
    assert kv["layout"] == "preallocated" and kv["length_input"] == "past_length" and kv["capacity_axis"] == 2
    assert meta["memc.graph"] == "decode" and meta["memc.layers"] == str(LAYERS)
    assert meta["memc.max_seq_len"] == str(MAX_POS)
    assert model.producer_name == "memc"
    # none of the exporter's node metadata (machine paths, name scopes) or value_info is shipped
    keys = {p.key for n in model.graph.node for p in n.metadata_props}
    assert not [k for k in keys if k.startswith("pkg.torch.onnx.")]
    assert len(model.graph.value_info) == 0


def test_build_writes_only_the_artifact(tiny_hf, tmp_path):
    out = tmp_path / "out"
    path = build_decode_artifact(tiny_hf("llama"), out)
    assert path == out / "decode.onnx"
    assert sorted(p.name for p in out.iterdir()) == ["decode.onnx"]  # no temporary files left behind
    onnx.checker.check_model(str(path))


def test_verify_decode_accepts_a_directory_a_callable_and_1d_ids(tiny_hf, decode_artifact):
    model_dir = tiny_hf("qwen2")
    model = load_hf_original(model_dir)
    ids = _ids(1, 12)[0]

    def reference(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(batch), use_cache=False).logits.numpy()

    by_dir = verify_decode(decode_artifact("qwen2").parent, model_dir, ids)
    by_fn = verify_decode(decode_artifact("qwen2"), reference, ids)
    assert by_dir.shape == by_fn.shape == [1, 12] and by_dir.prefill == 6
    assert by_dir.passed and by_fn.passed
    assert json.dumps(by_fn.as_dict())  # report-ready
    with pytest.raises(ValueError, match="prefill must be in 1..12"):
        verify_decode(decode_artifact("qwen2"), reference, ids, prefill=0)


def test_verify_decode_detects_a_wrong_reference(decode_artifact):
    """The check is not vacuous: a reference that differs gives a failing check with its max |Δ|."""
    engine = DecodeEngine(decode_artifact("llama"))
    ids = _ids(1, 8)
    check = verify_decode(engine, lambda batch: np.zeros((*batch.shape, VOCAB), np.float32), ids)
    assert not check.passed and check.max_abs_diff > 0.1


def test_sliding_window_cache_is_refused(tmp_path):
    import transformers as T

    cfg = T.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, sliding_window=16,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    T.MistralForCausalLM(cfg).save_pretrained(tmp_path / "mistral")
    with pytest.raises(UnsupportedError, match=r"attention site model\.layers\.0\.self_attn has a 'sliding' mask"):
        decode_graph(program_of(tmp_path / "mistral"))
    with pytest.raises(UnsupportedError):
        build_decode_artifact(tmp_path / "mistral", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- memc compile with [target] decode_graph = true --------------------------------------------------------------
def test_compile_emits_and_verifies_the_decode_graph(tiny_hf, compiled):
    res = compiled(str(tiny_hf("llama")), "--set", "target.decode_graph=true")  # shared with tests/eval
    assert res.rc == 0, res.explain()
    assert (res.out_dir / "decode.onnx").is_file()
    report = res.report
    assert [a["path"] for a in report["target"]["artifacts"]] == ["model.onnx", "decode.onnx"]
    assert report["target"]["decode"]["layers"] == LAYERS
    ver = report["verification"]
    assert ver["passed"] and 0 <= ver["max_abs_diff"]["decode.logits"] <= DEFAULT_ATOL
    modes = [s["mode"] for s in ver["samples"]]
    assert "forward" in modes and any(m.startswith("decode: prefill") for m in modes)
    assert report["config"]["target"]["decode_graph"] is True
    record_diff("decode llama (memc compile)", ver["max_abs_diff"]["decode.logits"])
    # the artifact from the compile runs in the engine like a standalone build
    tokens = DecodeEngine(res.out_dir).generate(_ids(1, 5)[0], 4)
    assert tokens.shape == (9,)


def test_compile_default_writes_no_decode_graph(tiny_hf, compiled):
    res = compiled(str(tiny_hf("llama")))
    assert res.rc == 0, res.explain()
    assert not (res.out_dir / "decode.onnx").exists()
    assert "decode.logits" not in res.report["verification"]["max_abs_diff"]


def test_compile_decode_graph_needs_an_hf_causal_lm(tiny_hf, tmp_path):
    cfg = write_toml(tmp_path / "toolchain.toml", """
        [target]
        decode_graph = true
    """)
    res = compile_model(tiny_hf("bert"), tmp_path / "out", "-c", cfg)
    assert res.rc == 2
    assert "decode_graph = true needs a causal LM" in res.stderr
    assert "Traceback" not in res.stderr
    assert not Path(res.out_dir).exists()
