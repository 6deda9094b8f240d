"""Memory footprint: parameter bytes and the inference state a full-attention model carries at a context length."""
from __future__ import annotations

import json
from pathlib import Path

from memc.eval.backends import Backend


def kv_cache_bytes_per_token(config_dir: Path | None, dtype_bytes: int = 4) -> int | None:
    """K and V for every layer and KV head of a transformers config; None when the config is unknown."""
    if config_dir is None or not (config_dir / "config.json").is_file():
        return None
    cfg = json.loads((config_dir / "config.json").read_text())
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    if not (layers and heads and hidden):
        return None
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def footprint(backend: Backend, contexts: list[int]) -> dict:
    per_token = kv_cache_bytes_per_token(backend.info.source_dir) if backend.info.task == "causal-lm" else None
    return {
        "parameter_bytes": backend.info.parameter_bytes,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes": {str(c): per_token * c for c in contexts} if per_token else {},
    }
