"""Footprint (parameter bytes, KV-cache bytes) from transformers configs, and the speed measurement's shape."""
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
    assert bert["kv_cache_bytes_per_token"] is None and bert["kv_cache_bytes"] == {}


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


def test_speed_uses_the_decode_graph_when_the_artifact_has_one(tiny_llama_dir, compiled, tmp_path_factory) -> None:
    """With decode.onnx next to model.onnx, decode is timed as KV-state steps, not recompute over the prefix."""
    toml = tmp_path_factory.mktemp("decode-cfg") / "decode.toml"
    toml.write_text("[target]\ndecode_graph = true\n")
    artifact = compiled(tiny_llama_dir, "-c", str(toml))
    assert artifact.rc == 0, artifact.explain()
    backend = load_backend(str(artifact.out_dir), threads=1)
    assert backend.decode_graph == artifact.out_dir / "decode.onnx"
    (point,) = speed(backend, [16], repeats=2)
    assert point.decode_mode == "kv-state" and math.isfinite(point.decode_ms_per_token) and point.decode_ms_per_token > 0
