"""Memory footprint: parameter bytes and the decode state the model carries at each context length.

An artifact with a decode graph reports the state its graph actually carries, from the recorded state layout
(decode.onnx's ``memc.state``, the same list report.json holds): a KV cache grows with the context, a capped
memory-caching state does not. Anything else falls back to the KV cache a full-attention transformers config
implies; a memory-caching artifact without a decode graph has no recorded layout, so it reports no state bytes
rather than a KV cache it does not have.
"""
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


def state_kind(kinds: set[str]) -> str:
    return {frozenset({"kv"}): "kv", frozenset({"mc"}): "memory-caching"}.get(frozenset(kinds), "kv+memory-caching")


def footprint(backend: Backend, contexts: list[int]) -> dict:
    """``state_bytes[str(context)]``: the decode state after that many tokens (batch 1); ``kv_cache_bytes``: the
    growing part of it (empty for a bounded state)."""
    base = {"parameter_bytes": backend.info.parameter_bytes}
    engine = backend.decode_engine() if backend.info.task == "causal-lm" else None
    if engine is not None:
        specs = engine.state_specs
        per_token = sum(s.nbytes(1, 1) - s.nbytes(1, 0) for s in specs)
        return {
            **base,
            "state_kind": state_kind({s.kind for s in specs}),
            "state_source": "decode.onnx state layout",
            "state_bytes": {str(c): engine.state_bytes_at(c) for c in contexts},
            "fixed_state_bytes": engine.state_bytes_at(0),
            "kv_cache_bytes_per_token": per_token or None,
            "kv_cache_bytes": {str(c): per_token * c for c in contexts} if per_token else {},
        }
    if "memory-caching" in backend.info.extra.get("passes", []):
        return {**base, "state_kind": "memory-caching", "state_source": None, "state_bytes": {},
                "fixed_state_bytes": None, "kv_cache_bytes_per_token": None, "kv_cache_bytes": {},
                "note": "memory-caching artifact without a decode graph: its state layout is recorded only when it "
                        "is compiled with [target] decode_graph = true"}
    per_token = kv_cache_bytes_per_token(backend.info.source_dir) if backend.info.task == "causal-lm" else None
    kv = {str(c): per_token * c for c in contexts} if per_token else {}
    return {
        **base,
        "state_kind": "kv" if per_token else None,
        "state_source": "config.json (full attention)" if per_token else None,
        "state_bytes": kv,
        "fixed_state_bytes": 0 if per_token else None,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes": kv,
    }
