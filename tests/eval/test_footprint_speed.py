"""Footprint (parameter bytes; decode state bytes from the decode graph's layout, else the KV cache a transformers
config implies) and the speed measurement's shape, with and without a decode graph."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from memc.errors import MemcError
from memc.eval.backends import Backend, ModelInfo, load_backend
from memc.eval.footprint import footprint, kv_cache_bytes_per_token
from memc.eval.speed import SpeedPoint, median_seconds, speed


def _save_config(directory: Path, config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return directory


def test_kv_bytes_llama_gqa(tmp_path: Path) -> None:
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)
    d = _save_config(tmp_path / "llama", cfg)
    # 2 (K and V) * layers * kv_heads * head_dim * 4 bytes (float32)
    assert kv_cache_bytes_per_token(d) == 2 * 3 * 2 * (64 // 8) * 4 == 384
    assert kv_cache_bytes_per_token(d, dtype_bytes=2) == 192


def test_kv_bytes_explicit_head_dim_wins(tmp_path: Path) -> None:
    import transformers as T

    cfg = T.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    d = _save_config(tmp_path / "qwen3", cfg)
    assert kv_cache_bytes_per_token(d) == 2 * 2 * 1 * 32 * 4  # not hidden/heads = 16


def test_kv_bytes_gpt2(tmp_path: Path) -> None:
    import transformers as T

    cfg = T.GPT2Config(n_embd=48, n_layer=5, n_head=6)  # GPT-2 names: n_layer, n_head, n_embd; no GQA
    d = _save_config(tmp_path / "gpt2", cfg)
    assert "n_layer" in json.loads((d / "config.json").read_text())
    assert kv_cache_bytes_per_token(d) == 2 * 5 * 6 * (48 // 6) * 4 == 2 * 5 * 48 * 4


def test_kv_bytes_unknown(tmp_path: Path) -> None:
    assert kv_cache_bytes_per_token(None) is None
    assert kv_cache_bytes_per_token(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "hidden_size": 8}))
    assert kv_cache_bytes_per_token(tmp_path) is None


def test_footprint_of_real_backends(tiny_llama_dir, tiny_gpt2_dir, tiny_bert_dir) -> None:
    llama = load_backend(str(tiny_llama_dir))
    fp = footprint(llama, [16, 64])
    per_token = 2 * 2 * 2 * (32 // 4) * 4  # tiny llama: 2 layers, 2 KV heads, head_dim 8
    assert fp == {
        "parameter_bytes": llama.info.parameter_bytes,
        "state_kind": "kv",
        "state_source": "config.json (full attention)",
        "state_bytes": {"16": 16 * per_token, "64": 64 * per_token},
        "fixed_state_bytes": 0,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes": {"16": 16 * per_token, "64": 64 * per_token},
    }
    # tied embeddings are counted once: embed (128x32) + 2 layers + final norm, all float32
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert llama.info.parameter_bytes == 4 * sum(unique.values())

    gpt2 = footprint(load_backend(str(tiny_gpt2_dir)), [10])
    assert gpt2["kv_cache_bytes_per_token"] == 2 * 2 * 32 * 4 and gpt2["kv_cache_bytes"] == {"10": 10 * 512}
    bert = footprint(load_backend(str(tiny_bert_dir)), [10])  # an encoder keeps no KV cache
    assert bert["kv_cache_bytes_per_token"] is None and bert["kv_cache_bytes"] == {} and bert["state_bytes"] == {}


class _Counting(Backend):
    name = "counting"

    def __init__(self, inputs=("input_ids",), max_seq_len=64):
        self.info = ModelInfo("causal-lm", list(inputs), 256, max_seq_len, 0, None)
        self.calls: list[dict[str, tuple]] = []

    def forward(self, feeds):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        assert all(v.dtype == np.int64 for v in feeds.values())
        ids = feeds["input_ids"]
        return np.zeros((*ids.shape, 4), dtype=np.float32)


def test_speed_fake_backend_calls() -> None:
    backend = _Counting(inputs=("input_ids", "attention_mask"))
    points = speed(backend, [8, 16], repeats=3, decode_steps=2)
    assert [p.context for p in points] == [8, 16]
    for p in points:
        assert isinstance(p, SpeedPoint) and p.decode_mode == "recompute"
        assert p.prefill_tokens_per_s > 0 and p.prefill_ms > 0 and p.decode_ms_per_token > 0
        assert p.prefill_tokens_per_s == pytest.approx(p.context / (p.prefill_ms / 1e3))
    shapes = [c["input_ids"] for c in backend.calls]
    assert all(c["attention_mask"] == c["input_ids"] for c in backend.calls)
    # prefill at full context (1 warm-up + 3 repeats), then recompute decode over the last 2 prefixes
    assert shapes[:4] == [(1, 8)] * 4
    assert (1, 7) in shapes and (1, 8) in shapes
    with pytest.raises(MemcError, match="longer than the model supports"):
        speed(backend, [128])


def test_speed_real_model_positive(tiny_llama_dir, compiled) -> None:
    artifact = compiled(tiny_llama_dir)
    assert artifact.rc == 0, artifact.explain()
    for backend in (load_backend(str(tiny_llama_dir)), load_backend(str(artifact.out_dir), threads=1)):
        points = speed(backend, [4, 16], repeats=2, decode_steps=2)
        assert [p.context for p in points] == [4, 16]
        for p in points:
            for v in (p.prefill_tokens_per_s, p.prefill_ms, p.decode_ms_per_token):
                assert math.isfinite(v) and v > 0, p


def test_median_seconds_runs_warmup_and_repeats() -> None:
    calls = []
    t = median_seconds(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and t >= 0


def test_speed_uses_the_decode_graph_when_the_artifact_has_one(tiny_llama_dir, compiled) -> None:
    """With decode.onnx next to model.onnx, decode is timed as KV-state steps, not recompute over the prefix."""
    artifact = compiled(tiny_llama_dir, "--set", "target.decode_graph=true")  # shared with tests/codegen
    assert artifact.rc == 0, artifact.explain()
    backend = load_backend(str(artifact.out_dir), threads=1)
    assert backend.decode_graph == artifact.out_dir / "decode.onnx"
    (point,) = speed(backend, [16], repeats=2)
    assert point.decode_mode == "kv-state" and math.isfinite(point.decode_ms_per_token) and point.decode_ms_per_token > 0


def test_decode_graph_speed_beyond_the_trained_positions(decode_artifact, tmp_path) -> None:
    """A KV decode graph is timed from a synthesised cache of the context's length, past the model's 128 trained
    positions too (with a note and no prefill); state bytes grow with the context."""
    from memc.eval.backends import OnnxBackend
    from memc.runtime.engine import DecodeEngine
    from tests.helpers import MAX_POS

    backend = _Counting(max_seq_len=MAX_POS)
    backend.decode_graph = decode_artifact("llama")
    points = speed(backend, [16, 3 * MAX_POS], repeats=2, steps=3)
    per_token = 2 * 2 * 2 * 8 * 4
    inside, beyond = points
    assert inside.decode_mode == beyond.decode_mode == "kv-state"
    assert inside.note is None and inside.prefill_ms > 0
    assert beyond.prefill_ms is None and beyond.prefill_tokens_per_s is None
    assert f"beyond the model's {MAX_POS} trained positions" in beyond.note
    assert inside.state_bytes == 16 * per_token and beyond.state_bytes == 3 * MAX_POS * per_token
    assert all(math.isfinite(p.decode_ms_per_token) and p.decode_ms_per_token > 0 for p in points)
    assert backend.decode_engine().max_seq_len == MAX_POS  # the limit is back after timing
    fp = footprint(backend, [16, 1000])
    assert fp["state_kind"] == "kv" and fp["state_source"] == "decode.onnx state layout"
    assert fp["state_bytes"] == {"16": 16 * per_token, "1000": 1000 * per_token} == fp["kv_cache_bytes"]
    # a state the engine reads back at that context is what the timing used
    from memc.eval.speed import state_at

    state = state_at(DecodeEngine(decode_artifact("llama")), 99, np.random.default_rng(0), 128)
    assert all(a.shape[2] == 99 for a in state)
    with pytest.raises(MemcError, match="context 1 is too short"):
        speed(backend, [1])


def test_memory_caching_footprint_and_speed_are_the_fixed_state(mc_compiled) -> None:
    """A memory-caching artifact reports its recorded fixed state (not the KV cache its config implies), the same
    at every context; timing sets the token counters to the context."""
    from memc.eval.speed import state_at
    from tests.helpers import MAX_POS

    backend = load_backend(str(mc_compiled.out_dir), threads=1)
    engine = backend.decode_engine()
    fixed = sum(np.prod([1 if d == "batch" else d for d in t["shape"]], dtype=np.int64) * np.dtype(t["dtype"]).itemsize
                for t in mc_compiled.report["target"]["decode"]["state"]["tensors"])
    fp = footprint(backend, [64, 32768])
    assert fp["state_kind"] == "memory-caching" and fp["state_source"] == "decode.onnx state layout"
    assert fp["state_bytes"] == {"64": fixed, "32768": fixed} and fp["kv_cache_bytes"] == {}
    assert fp["fixed_state_bytes"] == fixed and fp["kv_cache_bytes_per_token"] is None
    assert kv_cache_bytes_per_token(backend.info.source_dir) not in (None, 0)  # what it used to print instead
    state = state_at(engine, 5000, np.random.default_rng(0), 128, fill_tokens=20)
    counters = [a for s, a in zip(engine.state_specs, state) if s.name.startswith("past_mc_t_")]
    assert counters and all(int(a) == 5000 for a in counters)
    points = speed(backend, [16, 4 * MAX_POS], repeats=1, steps=3)
    assert [p.decode_mode for p in points] == ["mc-state"] * 2
    assert [p.state_bytes for p in points] == [fixed, fixed] and points[1].note and points[0].note is None


def test_memory_caching_artifact_without_a_decode_graph_claims_no_kv_cache(tiny_llama_dir) -> None:
    """Its config.json still describes full attention, but the artifact is memory-caching: no KV bytes printed."""
    backend = _Counting()
    backend.info.source_dir = tiny_llama_dir
    assert footprint(backend, [16])["kv_cache_bytes"] != {}  # a plain artifact: the config's KV cache
    backend.info.extra["passes"] = ["detect-attention", "memory-caching"]
    fp = footprint(backend, [16])
    assert fp["state_kind"] == "memory-caching" and fp["state_bytes"] == {} and fp["kv_cache_bytes"] == {}
    assert "decode_graph = true" in fp["note"]
