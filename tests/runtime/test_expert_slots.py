"""The expert cache's slot manager (LRU) against a plain reference, exact counts on crafted traces, token groups."""
from __future__ import annotations

import numpy as np
import pytest

from memc.runtime.expert_slots import SlotCache, token_groups


class ReferenceLRU:
    """LRU written the plain way: a last-used time per resident expert; keep the ``slots`` most recent."""

    def __init__(self, slots: int):
        self.slots, self.last, self.clock = slots, {}, 0
        self.requests = self.hits = self.loads = 0

    def admit(self, experts: list[int]) -> None:
        want = list(dict.fromkeys(experts))
        self.requests += len(want)
        self.hits += sum(e in self.last for e in want)
        self.loads += sum(e not in self.last for e in want)
        for e in want:
            self.clock += 1
            self.last[e] = self.clock
        keep = sorted(self.last, key=lambda e: (e in want, self.last[e]), reverse=True)[: self.slots]
        self.last = {e: self.last[e] for e in keep}


@pytest.mark.parametrize("slots,experts,k,seed", [(2, 4, 1, 0), (4, 16, 2, 1), (8, 16, 2, 2), (3, 8, 3, 3), (16, 16, 2, 4)])
def test_lru_equals_the_reference_on_random_traces(slots, experts, k, seed):
    rng = np.random.default_rng(seed)
    cache, ref = SlotCache(slots, experts), ReferenceLRU(slots)
    for _ in range(300):
        group = rng.choice(experts, size=int(rng.integers(1, slots + 1)) if k > 1 else k, replace=False).tolist()
        cache.admit(group)
        ref.admit(group)
        assert cache.resident == set(ref.last)
        assert set(cache.slot_of.values()) <= set(range(slots)) and len(set(cache.slot_of.values())) == len(cache.slot_of)
    assert (cache.stats.requests, cache.stats.hits, cache.stats.loads) == (ref.requests, ref.hits, ref.loads)


def test_exact_counts_on_a_crafted_trace():
    cache = SlotCache(2, 4)
    loads = [cache.admit([e]) for e in [0, 1, 0, 2, 1, 0]]
    # 0 miss, 1 miss, 0 hit, 2 evicts 1, 1 evicts 0, 0 evicts 2
    assert loads == [[(0, 0)], [(1, 1)], [], [(2, 1)], [(1, 0)], [(0, 1)]]
    assert cache.stats.as_dict() == {"requests": 6, "hits": 1, "loads": 5, "hit_rate": 1 / 6}
    pairs = SlotCache(3, 4)
    assert pairs.admit([0, 1]) == [(0, 0), (1, 1)]
    assert pairs.admit([2, 3]) == [(2, 2), (3, 0)]  # 3 replaces 0, the least recently used not asked for
    assert pairs.admit([0, 2]) == [(0, 1)]  # 2 hits; 0 replaces 1 (2 was just used)
    assert pairs.stats.as_dict() == {"requests": 6, "hits": 1, "loads": 5, "hit_rate": 1 / 6}
    table = pairs.lookup()
    assert table.tolist() == [1, -1, 2, 0]


def test_admit_refuses_what_does_not_fit():
    cache = SlotCache(2, 4)
    with pytest.raises(ValueError, match="do not fit in 2 slots"):
        cache.admit([0, 1, 2])
    with pytest.raises(ValueError, match="0..3"):
        cache.admit([4])
    with pytest.raises(ValueError, match="slots must be in 1..4"):
        SlotCache(5, 4)


def test_token_groups_cover_every_token_once_and_fit():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(16, 2, replace=False) for _ in range(64)])
    for slots in (2, 4, 8, 16):
        groups = token_groups(ids, slots, resident={int(ids[5, 0]), int(ids[5, 1])})
        rows = np.concatenate(groups)
        assert sorted(rows.tolist()) == list(range(64))
        assert all(len(set(ids[g].reshape(-1).tolist())) <= slots for g in groups)
        if slots == 16:
            assert len(groups) == 1
        if slots == 2:  # tokens whose two experts are resident go first, without loads
            assert 5 in groups[0].tolist() and all(set(ids[r]) == set(ids[5]) for r in groups[0])
    with pytest.raises(ValueError, match="routes to 2 experts"):
        token_groups(ids, 1)
