"""memc.eval.routing against plain brute-force forms of the same definitions on small random traces.

SRP is recomputed from sets of (token, expert) pairs, every cache policy by re-reading the whole history at each
eviction, and Belady's hit rate against an exhaustive search over every eviction choice (it must be the optimum)."""
from __future__ import annotations

from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest

from memc.eval import routing


def random_trace(seed: int, windows: int, tokens: int, experts: int, k: int, stick: float = 0.5) -> np.ndarray:
    """[windows, tokens, k] distinct experts per token; with probability ``stick`` a token repeats one of the previous
    token's experts, so caches and segments have some locality to find."""
    rng = np.random.default_rng(seed)
    out = np.zeros((windows, tokens, k), np.int64)
    for w in range(windows):
        prev = rng.choice(experts, k, replace=False)
        for t in range(tokens):
            row = list(rng.choice(experts, k, replace=False))
            if rng.random() < stick and prev[0] not in row:
                row[0] = prev[0]
            out[w, t] = row
            prev = out[w, t]
    return out


CASES = [(seed, w, t, e, k) for seed, (w, t, e, k) in enumerate(
    [(1, 12, 4, 1), (2, 20, 6, 2), (3, 17, 8, 2), (1, 40, 5, 3), (2, 33, 16, 2), (2, 25, 7, 1)])]


# --- SRP ------------------------------------------------------------------------------------------------------------
def srp_brute(trace: np.ndarray, experts: int, m: int) -> float:
    """max over tau of the F1 of the predicted (token, expert) pairs of every m-token segment vs the routed ones."""
    best = 0.0
    for tau in range(m + 1):
        tp = predicted = routed = 0
        for window in trace:
            for s in range(len(window) - m + 1):
                seg = [set(int(e) for e in row) for row in window[s : s + m]]
                chosen = {e for e in range(experts) if sum(e in row for row in seg) >= tau}
                pred = {(t, e) for t in range(m) for e in chosen}
                real = {(t, e) for t, row in enumerate(seg) for e in row}
                tp += len(pred & real)
                predicted += len(pred)
                routed += len(real)
        best = max(best, 2 * tp / (predicted + routed))
    return best


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_srp_matches_brute_force(case, m) -> None:
    seed, w, t, e, k = case
    trace = random_trace(seed, w, t, e, k)
    got = routing.srp(trace, e, m)
    assert got.f1 == pytest.approx(srp_brute(trace, e, m), abs=1e-12)
    assert got.segments == w * (t - m + 1)
    assert 2 * k / (e + k) - 1e-12 <= got.f1 <= 1.0  # tau = 0 (predict every expert) is always available


def test_srp_edges() -> None:
    trace = random_trace(0, 2, 30, 8, 2)
    assert routing.srp(trace, 8, 1).f1 == 1.0  # a one-token segment predicts its own experts exactly
    assert routing.srp(trace, 8, 31) is None  # longer than a window: no segment
    constant = np.tile(np.array([3, 5]), (2, 30, 1))
    assert routing.srp(constant, 8, 16).f1 == 1.0 and routing.srp(constant, 8, 16).threshold >= 1
    counts = routing.segment_counts(constant, 8, 4)
    assert counts.shape == (2, 27, 8) and (counts[..., 3] == 4).all() and counts[..., 0].sum() == 0


# --- caches ---------------------------------------------------------------------------------------------------------
def cache_brute(trace: np.ndarray, experts: int, slots: int, policy: str, m: int = 1) -> float:
    """The cache accounting of memc.eval.routing, each eviction decided by re-reading the history and the future."""
    hits = 0
    for window in trace:
        rows = [[int(e) for e in row] for row in window]
        refs: list[int] = []  # every (token, expert) use so far, in order
        cache: list[int] = []
        for t, need in enumerate(rows):
            hits += sum(e in cache for e in need)
            for e in need:
                if e in cache:
                    continue
                if len(cache) < slots:
                    hits += 1
                    cache.append(e)
                    continue
                candidates = [r for r in cache if r not in need]

                def last_use(r: int) -> int:
                    return max(i for i, x in enumerate(refs) if x == r)

                if policy == "lru":
                    victim = min(candidates, key=last_use)
                elif policy == "lfu":
                    victim = min(candidates, key=lambda r: (refs.count(r), last_use(r)))
                elif policy == "belady":
                    def next_use(r: int) -> int:
                        return next((u for u in range(t + 1, len(rows)) if r in rows[u]), len(rows) + 1)

                    victim = min(candidates, key=lambda r: (-next_use(r), last_use(r)))
                else:  # sch: uses in the rest of the m-token segment starting at t
                    victim = min(candidates, key=lambda r: (sum(r in row for row in rows[t + 1 : t + m]), last_use(r)))
                cache.remove(victim)
                cache.append(e)
            refs.extend(need)
    return hits / trace.size


def optimal_rate(trace: np.ndarray, slots: int) -> float:
    """The best hit rate any eviction choices reach (exhaustive search, same accounting)."""
    total = 0
    for window in trace:
        rows = tuple(tuple(int(e) for e in row) for row in window)

        @lru_cache(maxsize=None)
        def best(t: int, cache: frozenset) -> int:
            if t == len(rows):
                return 0
            need = set(rows[t])
            missing = need - cache
            free = min(len(missing), slots - len(cache))
            evict = len(missing) - free
            now = len(need) - len(missing) + free
            return now + max(best(t + 1, frozenset((cache - set(v)) | need))
                             for v in combinations(sorted(cache - need), evict))

        total += best(0, frozenset())
    return total / trace.size


@pytest.mark.parametrize("case", CASES)
def test_policies_match_brute_force(case) -> None:
    seed, w, t, e, k = case
    trace = random_trace(seed, w, t, e, k)
    for slots in range(k, e + 2):
        for policy in routing.POLICIES:
            assert routing.hit_rate(trace, e, slots, policy) == pytest.approx(
                cache_brute(trace, e, slots, policy), abs=1e-12), (policy, slots)
        for m in (1, 2, 4, 9):
            assert routing.sch(trace, e, m, slots) == pytest.approx(
                cache_brute(trace, e, slots, "sch", m), abs=1e-12), (m, slots)


@pytest.mark.parametrize("seed", range(40))
def test_belady_is_best_possible(seed) -> None:
    rng = np.random.default_rng(seed)
    e, k = int(rng.integers(3, 7)), int(rng.integers(1, 3))
    trace = random_trace(seed, 2, int(rng.integers(5, 11)), e, k, stick=float(rng.random()))
    for slots in range(k, e + 1):
        belady = routing.hit_rate(trace, e, slots, "belady")
        assert belady == pytest.approx(optimal_rate(trace, slots), abs=1e-12)
        for other in (routing.hit_rate(trace, e, slots, "lru"), routing.hit_rate(trace, e, slots, "lfu"),
                      routing.sch(trace, e, 3, slots)):
            assert belady >= other - 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_belady_beats_lru_and_lfu_on_larger_traces(seed) -> None:
    trace = random_trace(100 + seed, 3, 200, 16, 2, stick=seed / 20)
    for slots in (2, 4, 6, 8):
        belady = routing.hit_rate(trace, 16, slots, "belady")
        assert belady >= routing.hit_rate(trace, 16, slots, "lru") - 1e-12
        assert belady >= routing.hit_rate(trace, 16, slots, "lfu") - 1e-12


def test_full_cache_hits_everything_and_small_cache_refused() -> None:
    trace = random_trace(7, 3, 50, 6, 2)
    for slots in (6, 7, 12):
        for policy in routing.POLICIES:
            assert routing.hit_rate(trace, 6, slots, policy) == 1.0
        assert routing.sch(trace, 6, 4, slots) == 1.0
    assert routing.hit_rate(trace, 6, 5, "lru") < 1.0
    assert routing.sch(trace, 6, 1, 3) == routing.hit_rate(trace, 6, 3, "lru")  # SCH with m = 1 is LRU
    with pytest.raises(ValueError, match="cannot hold"):
        routing.hit_rate(trace, 6, 1, "lru")
    with pytest.raises(ValueError, match="distinct"):
        routing.hit_rate(np.zeros((1, 4, 2), np.int64), 6, 2, "lru")


# --- load divergence ------------------------------------------------------------------------------------------------
def test_jsd_bits() -> None:
    rng = np.random.default_rng(0)
    p, q = rng.random(16), rng.random(16)
    assert routing.jsd_bits(p, q) == pytest.approx(routing.jsd_bits(q, p), abs=1e-15)
    assert 0 < routing.jsd_bits(p, q) < 1
    assert routing.jsd_bits(p, p) == pytest.approx(0.0, abs=1e-15)
    assert routing.jsd_bits([1, 1, 0, 0], [0, 0, 2, 3]) == pytest.approx(1.0, abs=1e-12)
    # H([3/4, 1/4]) - (H([1, 0]) + H([1/2, 1/2])) / 2 bits
    assert routing.jsd_bits([1, 0], [0.5, 0.5]) == pytest.approx(0.8112781244591328 - 0.5, abs=1e-12)


def test_expert_load() -> None:
    trace = np.array([[[0, 1], [0, 2], [0, 3]]])
    assert routing.expert_load(trace, 5).tolist() == [0.5, 1 / 6, 1 / 6, 1 / 6, 0.0]
