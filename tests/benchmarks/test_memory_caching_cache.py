"""benchmarks.memory_caching's per-window NLL cache: a rerun scores only windows it has not seen, a window whose ids
changed is scored again, and the key changes with anything the numbers depend on."""
from __future__ import annotations

import numpy as np
import pytest

import memc.eval.backends
import memc.eval.perplexity
from benchmarks.memory_caching import NllCache


@pytest.fixture
def scored(monkeypatch):
    calls: list[int] = []

    def fake_nll(backend, windows, batch=1):
        calls.append(len(windows))
        return windows[:, 1:].astype(np.float64) / 10  # a function of the ids, so stale rows would show

    monkeypatch.setattr(memc.eval.perplexity, "window_nll", fake_nll)
    monkeypatch.setattr(memc.eval.backends, "TorchBackend", lambda program: None)
    return calls


def test_rerun_scores_only_new_or_changed_windows(tmp_path, scored):
    cache = NllCache(tmp_path)
    windows = np.arange(5 * 4).reshape(5, 4)
    every_2nd = np.arange(0, 5, 2)
    first = cache.nll("k", None, windows[every_2nd], every_2nd, "x")
    assert scored == [3] and np.array_equal(first, windows[every_2nd, 1:] / 10)
    whole = cache.nll("k", None, windows, np.arange(5), "x")
    assert scored == [3, 2] and np.array_equal(whole, windows[:, 1:] / 10)
    changed = windows.copy()
    changed[1] += 100
    again = cache.nll("k", None, changed, np.arange(5), "x")
    assert scored == [3, 2, 1] and np.array_equal(again, changed[:, 1:] / 10)
    assert [p.name for p in tmp_path.iterdir()] == ["k.npz"]  # no temporary file left behind


def test_off_scores_everything_every_time(scored):
    cache = NllCache(None)
    windows = np.arange(8).reshape(2, 4)
    cache.nll("k", None, windows, np.arange(2), "x")
    cache.nll("k", None, windows, np.arange(2), "x")
    assert scored == [2, 2]


def test_key_depends_on_model_files_layer_weights_memory_and_context(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"1")
    base = NllCache.key(str(model), {"window": 32}, weights, True, 1024)
    assert base == NllCache.key(str(model), {"window": 32}, weights, True, 1024)
    others = {NllCache.key(str(model), {"window": 16}, weights, True, 1024),
              NllCache.key(str(model), {"window": 32}, None, True, 1024),
              NllCache.key(str(model), {"window": 32}, weights, False, 1024),
              NllCache.key(str(model), {"window": 32}, weights, True, 512)}
    weights.write_bytes(b"2")
    others.add(NllCache.key(str(model), {"window": 32}, weights, True, 1024))
    (model / "config.json").write_text('{"a": 1}')
    others.add(NllCache.key(str(model), {"window": 32}, weights, True, 1024))
    assert base not in others and len(others) == 6


def test_recall_pool_override_touches_select_layers_only() -> None:
    from benchmarks.memory_caching import _with_pool

    select, gated = {"variant": "select", "max_tokens": 32}, {"variant": "gated", "max_tokens": 0}
    assert _with_pool(select, 256) == {"variant": "select", "max_tokens": 256} and select["max_tokens"] == 32
    assert _with_pool(gated, 256) is gated and _with_pool(select, None) is select


def test_state_table_has_each_variant_and_a_capped_form_of_unbounded_segment_memories() -> None:
    from benchmarks.memory_caching import kv_bytes, state_table

    gated = {"variant": "gated", "window": 32, "segment": 128, "feature_dim": 16, "max_segments": 0}
    select = {"variant": "select", "window": 32, "segment": 16, "keep": 0, "max_tokens": 256}
    t = state_table("cmd", {"gated": gated, "select": select}, (4, 2, 64))
    assert t.columns[2::2] == ["gated state bytes", "gated, max_segments = 8 state bytes", "select state bytes"]
    first, last = t.rows[0], t.rows[-1]
    assert last[0] == 32768 and last[1] == kv_bytes(4, 2, 64, 32768)
    assert last[2] > last[4]  # the cap bounds the gated state
    assert first[6] == last[6] and first[2] < last[2]  # the pool is full by 1k (992 candidates), then constant
    assert last[6] < last[1] / 100  # 304 raw tokens (window + open segment + pool) and their scores, vs 32k
