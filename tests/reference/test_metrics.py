"""Reference-model metrics: the load divergence between domains and the sampled-window measurement."""
from __future__ import annotations

import math

import numpy as np
import pytest

from memc.reference import metrics


def test_js_divergence_bounds_and_a_hand_computed_value() -> None:
    p = np.array([3.0, 1.0, 0.0, 0.0])
    assert metrics.js_divergence_bits(p, 2 * p) == pytest.approx(0.0, abs=1e-12)  # counts are normalised
    assert metrics.js_divergence_bits(p, np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(1.0)  # disjoint
    q = np.array([1.0, 1.0, 0.0, 0.0])  # p = (3/4, 1/4), q = (1/2, 1/2), m = (5/8, 3/8)
    want = 0.5 * (0.75 * math.log2(0.75 / 0.625) + 0.25 * math.log2(0.25 / 0.375)) + 0.5 * (
        0.5 * math.log2(0.5 / 0.625) + 0.5 * math.log2(0.5 / 0.375))
    assert metrics.js_divergence_bits(p, q) == pytest.approx(want, rel=1e-12)
    assert metrics.js_divergence_bits(p, q) == pytest.approx(metrics.js_divergence_bits(q, p))


def test_load_divergence_covers_every_pair_and_layer() -> None:
    stats = {}
    for name, hot in (("a", 0), ("b", 0), ("c", 3)):
        s = metrics.RoutingStats(layers=2, experts=4)
        s.counts[:, hot] = 10
        s.counts[:, (hot + 1) % 4] = 10
        stats[name] = s
    rows = metrics.load_divergence(stats)
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["pairs"] == {"a|b": 0.0, "a|c": 0.5, "b|c": 0.5}  # a, b share both experts; c shares one of two
    assert rows[0]["mean"] == pytest.approx(1 / 3, abs=1e-4)
