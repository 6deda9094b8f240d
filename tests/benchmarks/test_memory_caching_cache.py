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
