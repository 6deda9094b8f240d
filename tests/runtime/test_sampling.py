"""memc.runtime.sampling against a brute-force reference (one token at a time, plain Python) and against
transformers' own logits warpers (temperature -> top-k -> top-p), plus the draw itself (seeded, frequencies)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from memc.runtime.sampling import Sampler, SamplingConfig, SamplingError, probabilities

CONFIGS = [
    SamplingConfig(1.0), SamplingConfig(0.7), SamplingConfig(1.3, top_k=5), SamplingConfig(1.0, top_p=0.6),
    SamplingConfig(0.8, top_k=10, top_p=0.9), SamplingConfig(2.0, top_k=1), SamplingConfig(1.0, top_p=1e-6),
    SamplingConfig(1.0, top_k=40),  # k >= vocab: no filter
]


def brute_force(row: list[float], cfg: SamplingConfig) -> list[float]:
    """The distribution for one row, token by token: the definitions in the module docstring, written plainly."""
    n = len(row)
    if cfg.temperature == 0:
        best = max(range(n), key=lambda i: (row[i], -i))
        return [1.0 if i == best else 0.0 for i in range(n)]
    x = [v / cfg.temperature for v in row]
    keep = [True] * n
    if 0 < cfg.top_k < n:
        kth = sorted(x, reverse=True)[cfg.top_k - 1]
        keep = [v >= kth for v in x]
    m = max(v for v, k in zip(x, keep) if k)
    w = [math.exp(v - m) if k else 0.0 for v, k in zip(x, keep)]
    total = sum(w)
    p = [v / total for v in w]
    if cfg.top_p < 1:
        order = sorted(range(n), key=lambda i: (-p[i], i))
        mass, kept = 0.0, set()
        for rank, i in enumerate(order):
            if rank == 0 or mass < cfg.top_p:
                kept.add(i)
            mass += p[i]
        total = sum(p[i] for i in kept)
        p = [p[i] / total if i in kept else 0.0 for i in range(n)]
    return p


def _logits(batch: int = 3, vocab: int = 32, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * 2).astype(np.float32)


@pytest.mark.parametrize("cfg", CONFIGS + [SamplingConfig(0.0, top_k=3)], ids=repr)
def test_probabilities_equal_the_brute_force_reference(cfg):
    logits = _logits()
    got = probabilities(logits, cfg)
    want = np.array([brute_force(row.astype(np.float64).tolist(), cfg) for row in logits])
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-12)


def test_ties_at_the_top_k_boundary_are_kept():
    logits = np.array([[3.0, 1.0, 1.0, 1.0, 0.0]], np.float32)
    p = probabilities(logits, SamplingConfig(1.0, top_k=2))
    assert (p[0, :4] > 0).all() and p[0, 4] == 0
    np.testing.assert_allclose(p[0], brute_force(logits[0].tolist(), SamplingConfig(1.0, top_k=2)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_probabilities_equal_transformers_warpers(cfg):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    logits = _logits(seed=3)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(cfg.temperature)])
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    scores = warpers(None, torch.from_numpy(logits).double())
    want = torch.softmax(scores, -1).numpy()
    np.testing.assert_allclose(probabilities(logits, cfg), want, atol=1e-12)


def test_greedy_is_argmax_and_ignores_the_filters():
    logits = _logits(4)
    np.testing.assert_array_equal(Sampler(SamplingConfig(0.0, top_k=3, top_p=0.5))(logits), logits.argmax(-1))
    assert Sampler(SamplingConfig(0.0))(logits).dtype == np.int64


def test_same_seed_same_tokens_and_seeds_differ():
    logits = _logits(8, 64)
    cfg = SamplingConfig(1.0, seed=7)
    a, b = Sampler(cfg), Sampler(cfg)
    draws_a = [a(logits) for _ in range(5)]
    np.testing.assert_array_equal(np.stack(draws_a), np.stack([b(logits) for _ in range(5)]))
    other = Sampler(SamplingConfig(1.0, seed=8))
    assert not np.array_equal(np.stack(draws_a), np.stack([other(logits) for _ in range(5)]))


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0, seed=1), SamplingConfig(0.9, top_k=4, top_p=0.8, seed=2)],
                         ids=repr)
def test_draw_frequencies_follow_the_distribution(cfg):
    """20,000 draws of one row: every token's frequency within 5 standard errors of its probability, and never a
    token the filters removed."""
    logits = _logits(1, 12, seed=5)
    p = probabilities(logits, cfg)[0]
    sampler = Sampler(cfg)
    rows = np.repeat(logits, 2000, axis=0)  # one call draws each row independently
    counts = np.bincount(np.concatenate([sampler(rows) for _ in range(10)]), minlength=12)
    n = counts.sum()
    assert (counts[p == 0] == 0).all()
    se = np.sqrt(p * (1 - p) / n)
    assert (np.abs(counts / n - p) <= 5 * se + 1e-12).all(), (counts / n, p)


def test_a_one_hot_distribution_always_draws_its_token():
    logits = np.full((2, 10), -1e4, np.float32)
    logits[0, 3] = logits[1, 9] = 10.0
    tokens = np.stack([Sampler(SamplingConfig(1.0, seed=s))(logits) for s in range(50)])
    assert (tokens[:, 0] == 3).all() and (tokens[:, 1] == 9).all()


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k must be an int >= 0"),
    ({"top_k": 2.5}, "top_k must be an int"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -3}, "seed must be an int >= 0"),
])
def test_bad_options_name_the_option(kwargs, needle):
    with pytest.raises(SamplingError, match=needle):
        SamplingConfig(**kwargs)


def test_bad_logits():
    with pytest.raises(SamplingError, match=r"logits must be a float array \[batch, vocab\]"):
        Sampler(SamplingConfig(1.0))(np.zeros(5, np.float32))
    with pytest.raises(SamplingError, match="logits must be a float array"):
        probabilities(np.zeros((1, 5), np.int64), SamplingConfig(1.0))
