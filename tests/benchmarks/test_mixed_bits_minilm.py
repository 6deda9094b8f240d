"""benchmarks/mixed_bits_minilm.py: the pipeline it compiles the MiniLM artifact with is a valid memc config whose
passes resolve in order (sensitivity -> allocate -> quantize after dead-code elimination), with the budget set."""
from __future__ import annotations

import pytest

from benchmarks.mixed_bits_minilm import CANDIDATES, mixed_bits_config
from memc.config import parse_config
from memc.errors import ConfigError
from memc.passes.base import create_pass
from memc.passes.manager import check_order


def test_config_resolves_in_order() -> None:
    cfg = parse_config(mixed_bits_config("15MB", "", "rtn"), "test")
    passes = [create_pass(s.name, s.options, s.path) for s in cfg.pipeline]
    check_order(passes, set())
    assert [p.name for p in passes] == ["eliminate-dead-code", "quant-sensitivity", "allocate-bits", "quantize"]
    assert passes[1].config.candidates == CANDIDATES and passes[1].config.score == "mse"
    assert passes[2].config.budget == "15MB" and passes[3].config.method == "rtn"
    assert cfg.calibration.source == "trainsplit:prose"


def test_bad_budget_is_refused() -> None:
    cfg = parse_config(mixed_bits_config("15 megabytes", ""), "test")
    with pytest.raises(ConfigError, match="budget"):
        create_pass(cfg.pipeline[2].name, cfg.pipeline[2].options, cfg.pipeline[2].path)
