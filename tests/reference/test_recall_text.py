"""memc.reference.recall_text: the filler survives whole, each planted line appears twice (plant, then query with
its answer) within the gap, and the same seed gives the same text."""
from __future__ import annotations

import re

import numpy as np
import pytest

from memc.reference.recall_text import planted_text

FILLER = b"".join(f"line {i:05d} = 'filler'\n".encode() for i in range(2000))  # 22 bytes a line


def test_planted_lines_come_in_pairs_within_the_gap_and_the_filler_is_whole() -> None:
    text = planted_text(FILLER, np.random.default_rng(0), every=200, max_gap=1000)
    lines = text.splitlines(keepends=True)
    planted = [(n, x) for n, x in enumerate(lines) if x.startswith(b"k_")]
    assert b"".join(x for x in lines if not x.startswith(b"k_")) == FILLER
    assert all(re.fullmatch(rb"k_[a-z]{5} = '[a-z]{6}'\n", x) for _, x in planted)
    by_line: dict[bytes, list[int]] = {}
    for n, x in planted:
        by_line.setdefault(x, []).append(n)
    assert len(by_line) > 100 and all(len(v) == 2 for v in by_line.values())
    offsets = np.cumsum([0] + [len(x) for x in lines])
    gaps = [offsets[b] - offsets[a] for a, b in by_line.values()]
    assert min(gaps) > 0 and max(gaps) <= 1000 + 22 * 2 + 1000 // 200 * 40  # the gap, a line, the lines planted between
    assert max(gaps) > 500  # long gaps are drawn, not only adjacent lines


def test_same_seed_same_text() -> None:
    a = planted_text(FILLER, np.random.default_rng(1))
    assert a == planted_text(FILLER, np.random.default_rng(1)) != planted_text(FILLER, np.random.default_rng(2))


def test_bad_spacing_is_refused() -> None:
    with pytest.raises(ValueError, match="every"):
        planted_text(FILLER, np.random.default_rng(0), every=0)


def test_written_text_is_accepted_as_train_text(tmp_path) -> None:
    """The distill pass refuses a file holding a held-out document; the written text never does."""
    from memc.eval.text import load_train_text
    from memc.reference.recall_text import write

    out = tmp_path / "recall.txt"
    recipe = write(out, 200_000)
    assert recipe["bytes"] == len(out.read_bytes()) > 200_000
    assert load_train_text(str(out), "pipeline[2].text") == out.read_bytes()
