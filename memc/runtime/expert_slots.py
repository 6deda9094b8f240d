"""Host-side slot management of an expert cache: C slots per MoE layer, least recently used replaced first.

``SlotCache.admit(experts)`` makes a set of experts resident at once (the k experts of a token, or the union of a
token group's) and returns the loads to do; it counts requests (distinct experts asked for per admit), hits and
loads. ``token_groups`` splits a call's tokens into groups whose experts fit in the slots together, so a prompt of
any length runs exactly with C >= k: the tokens whose experts are all resident go first (no loads), then the others
first-fit in order. numpy only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class SlotStats:
    requests: int = 0  # distinct experts asked for, summed over admits
    hits: int = 0  # of those, already resident
    loads: int = 0  # experts copied from the store into a slot

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.requests if self.requests else None

    def as_dict(self) -> dict:
        return {"requests": self.requests, "hits": self.hits, "loads": self.loads, "hit_rate": self.hit_rate}


class SlotCache:
    """One layer's ``slots`` slots over ``experts`` experts: expert id -> slot, LRU replacement."""

    def __init__(self, slots: int, experts: int):
        if not 1 <= slots <= experts:
            raise ValueError(f"slots must be in 1..{experts}, got {slots}")
        self.slots, self.experts = slots, experts
        self.slot_of: dict[int, int] = {}
        self._recency: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._free = list(range(slots))
        self._table = np.full(experts, -1, dtype=np.int64)  # expert id -> slot, -1 where not resident
        self.stats = SlotStats()

    @property
    def resident(self) -> set[int]:
        return set(self.slot_of)

    def admit(self, needed: Sequence[int]) -> list[tuple[int, int]]:
        """Make every expert in ``needed`` resident together; returns the ``(expert, slot)`` loads to do, in order.
        The experts become the most recently used, in the order given."""
        want = list(dict.fromkeys(int(e) for e in needed))
        if len(want) > self.slots:
            raise ValueError(f"{len(want)} experts do not fit in {self.slots} slots at once")
        if any(not 0 <= e < self.experts for e in want):
            raise ValueError(f"expert ids must be in 0..{self.experts - 1}, got {want}")
        keep = set(want)
        loads = []
        self.stats.requests += len(want)
        for e in want:
            if e in self.slot_of:
                self.stats.hits += 1
                self._recency.move_to_end(e)
                continue
            if self._free:
                slot = self._free.pop(0)
            else:
                victim = next(v for v in self._recency if v not in keep)
                slot = self.slot_of.pop(victim)
                del self._recency[victim]
                self._table[victim] = -1
            self.slot_of[e] = slot
            self._table[e] = slot
            self._recency[e] = None
            loads.append((e, slot))
        self.stats.loads += len(loads)
        return loads

    def lookup(self) -> np.ndarray:
        """expert id -> slot (-1 where not resident), for mapping an ids array with one gather (read-only: it
        changes with the next admit)."""
        return self._table


def token_groups(ids: np.ndarray, slots: int, resident: set[int] = frozenset()) -> list[np.ndarray]:
    """Row indices of ``ids [n, k]`` in groups whose experts fit in ``slots`` together (needs slots >= k)."""
    n = ids.shape[0]
    sets = [frozenset(int(e) for e in row) for row in ids]
    if n and max(len(s) for s in sets) > slots:
        raise ValueError(f"a token routes to {max(len(s) for s in sets)} experts; {slots} slots cannot hold them")
    union = frozenset().union(*sets) if sets else frozenset()
    if len(union) <= slots:
        return [np.arange(n)]
    order = [r for r in range(n) if sets[r] <= resident] + [r for r in range(n) if not sets[r] <= resident]
    groups, pending = [], order
    while pending:
        chosen, need, rest = [], set(), []
        for r in pending:
            if len(need | sets[r]) <= slots:
                need |= sets[r]
                chosen.append(r)
            else:
                rest.append(r)
        groups.append(np.asarray(sorted(chosen), dtype=np.int64))
        pending = rest
    return groups
