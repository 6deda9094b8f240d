"""benchmarks/mixed_bits_select.py: the validation windows share no token position with what calibration and
distillation read (checked by n-grams of a random text, where any shared 12-gram means a shared position)."""
from __future__ import annotations

import numpy as np
import pytest

import benchmarks.mixed_bits_select as sel
from memc.capture import capture
from memc.config import ToolchainConfig
from tests.eval.conftest import save_tiny_llama


def test_validation_windows_avoid_every_occurrence() -> None:
    tokens = np.arange(100) % 50  # the same 50 tokens twice: a read row occurs at two places
    free = [0, 20, 30, 40, 50, 70, 80, 90]  # 10 and 60 hold the read row
    assert list(sel.validation_windows(tokens, [tokens[10:20]], count=8, context=10)) == free
    assert list(sel.validation_windows(tokens, [tokens[10:20]], count=3, context=10)) == [0, 50, 90]  # evenly spaced
    with pytest.raises(RuntimeError, match="not in the validation"):
        sel.validation_windows(tokens, [np.array([99, 98])], count=1, context=10)
    with pytest.raises(RuntimeError, match="only 8"):
        sel.validation_windows(tokens, [tokens[10:20]], count=9, context=10)


def test_disjoint_from_calibration_and_distillation(tmp_path) -> None:
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz .\n"), 40_000))
    (tmp_path / "train.txt").write_text(text)
    cfg = ToolchainConfig()
    cfg.calibration.source, cfg.calibration.num_samples, cfg.calibration.seq_len = str(tmp_path / "train.txt"), 4, 64
    program = capture(str(save_tiny_llama(tmp_path / "llama")), cfg)  # byte-level: vocab 256
    read = sel.read_windows(program, cfg, [8, 16])
    assert len(read) == 4 + 8 + 16 and {len(r) for r in read[:4]} == {64 * cfg.inputs.batch}  # samples: one stretch
    tokens = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)  # the tiny model reads bytes
    starts = sel.validation_windows(tokens, read, count=20, context=256)

    def grams(rows) -> set:
        return {tuple(r[i : i + 12]) for r in rows for i in range(len(r) - 11)}

    assert not grams(read) & grams([tokens[s : s + 256] for s in starts])
    assert len(set(starts)) == 20 and starts[0] < starts[-1]


def test_select_picks_the_lowest_validation_bits() -> None:
    from benchmarks.harness import Table

    nbytes = [100.0, 120.0, 90.0]
    raw = {"nbytes": nbytes, **{c.name: {"bits": [50.0 + i, 60.0 + i, 40.0 + i]} for i, c in enumerate(sel.CANDIDATES)}}
    raw[sel.CANDIDATES[2].name]["bits"] = [49.0, 59.0, 39.0]
    table = sel._select(Table("t", "cmd", ["candidate"], [], [], raw))
    assert table.raw["selected"] == sel.CANDIDATES[2].name and "selected" in table.notes[-1]
    partial = Table("t", "cmd", ["candidate"], [], [], {"nbytes": nbytes, sel.CANDIDATES[0].name: {"bits": [1.0]}})
    assert "selected" not in sel._select(partial).raw  # no choice before every candidate is measured
