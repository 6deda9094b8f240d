"""benchmarks.decode.turn_orders: no engine's slice right after its own, and with three engines each follows each
other one equally often (the schedule the decode benchmark's @990 medians rest on)."""
from __future__ import annotations

import collections

import pytest

from benchmarks.decode import turn_orders


def _predecessors(orders: list[list[str]]) -> collections.Counter:
    flat = [k for turn in orders for k in turn]
    return collections.Counter(zip(flat, flat[1:]))


@pytest.mark.parametrize("keys", [["t", "m"], ["t", "m", "g"], ["t", "a", "b", "c"], list("abcde")])
def test_no_engine_follows_itself(keys):
    orders = turn_orders(keys, 8)
    assert len(orders) == 8 and all(sorted(o) == sorted(keys) for o in orders)
    assert not any(a == b for a, b in _predecessors(orders))


def test_three_engines_follow_each_other_equally():
    pairs = _predecessors(turn_orders(["t", "m", "g"], 8))
    for engine in "tmg":
        before = collections.Counter({a: n for (a, b), n in pairs.items() if b == engine})
        assert len(before) == 2 and max(before.values()) - min(before.values()) <= 1, (engine, before)


def test_the_reversed_schedule_gives_the_ends_back_to_back_slices():
    pairs = _predecessors(turn_orders(["t", "m", "g"], 4, "reversed"))
    assert pairs[("g", "g")] and pairs[("t", "t")] and not pairs[("m", "m")]
    with pytest.raises(ValueError, match="order must be alternate | reversed"):
        turn_orders(["t", "m", "g"], 2, "random")
