"""The paired Δ bits/byte and its standard error, checked against a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from memc.eval.paired import paired_delta, window_bits


def test_delta_and_se_match_a_direct_computation():
    rng = np.random.default_rng(0)
    nll_a = rng.uniform(0.5, 3.0, (40, 15))
    nll_b = nll_a + rng.normal(0.05, 0.02, (40, 15))
    spans = rng.integers(1, 5, (40, 15))
    d = paired_delta(nll_a, nll_b, spans)
    total = spans.sum()
    assert d.bits_per_byte_a == pytest.approx(nll_a.sum() / math.log(2) / total)
    assert d.delta == pytest.approx((nll_b - nll_a).sum() / math.log(2) / total)
    assert d.windows == 40 and d.per_byte_ppl_change == pytest.approx(2**d.delta - 1)
    # the SE shrinks like 1/sqrt(n): the same per-window noise over 4x the windows halves it
    big = paired_delta(np.tile(nll_a, (4, 1)), np.tile(nll_b, (4, 1)), np.tile(spans, (4, 1)))
    assert big.se == pytest.approx(d.se / 2, rel=0.05)
    assert paired_delta(nll_a, nll_a, spans).se == 0.0


def test_positions_select_late_tokens_only():
    nll = np.zeros((2, 9))
    nll[:, 4:] = math.log(2)  # one bit for tokens at positions 5..9
    bits, nbytes = window_bits(nll, np.ones((2, 9)), from_position=5)
    assert bits.tolist() == [5.0, 5.0] and nbytes.tolist() == [5.0, 5.0]
