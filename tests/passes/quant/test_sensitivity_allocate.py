"""quant-sensitivity (fisher and kl, monotone, cached, 2 workers == 1) and allocate-bits (ties, budget, errors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memc.errors import ConfigError
from memc.passes.base import PassContext
from memc.passes.quant.allocate import AllocateBits, AllocateOptions
from memc.passes.quant.quantize import PLAN, Quantize, QuantizeOptions
from memc.passes.quant.sensitivity import SENSITIVITY, QuantSensitivity, SensitivityOptions
from memc.quant.sensitivity import compute_scores, monotone
from memc.quant.sites import find_weights, tie_groups

CANDIDATES = ["int2-g16", "int4-g16", "int8-g32", "keep"]


def _ctx(n=2):
    gen = torch.Generator().manual_seed(3)
    return PassContext(seed=0, calibration=[(torch.randint(0, 128, (2, 16), generator=gen),) for _ in range(n)])


def _sensitivity(program, tmp_path, score="fisher", **kw):
    opts = SensitivityOptions(candidates=CANDIDATES, score=score, cache_dir=str(tmp_path), measure_graph=False, **kw)
    return QuantSensitivity(opts).run(program, _ctx())


@pytest.mark.parametrize("score", ["fisher", "kl", "mse"])
def test_scores_monotone_and_cached(tiny_llama_program, tmp_path, score):
    r = _sensitivity(tiny_llama_program, tmp_path, score)
    table = tiny_llama_program.annotations[SENSITIVITY]["table"]
    assert not r.metrics["cached"] and len(table.groups) == 9
    s, b = np.array(table.scores), np.array(table.bytes)
    assert (b[:, 0] < b[:, 1]).all() and (b[:, 1] < b[:, 2]).all() and (b[:, 2] < b[:, 3]).all()
    assert (np.diff(s, axis=1) <= 0).all() and (s[:, -1] == 0).all()
    assert (s[:, 0] > s[:, 1]).all()  # 2 bits hurt more than 4 on every group (raw scores, not only monotone)
    again = _sensitivity(tiny_llama_program, tmp_path, score)
    assert again.metrics["cached"]
    assert tiny_llama_program.annotations[SENSITIVITY]["table"].scores == table.scores


def test_monotone_helper():
    assert monotone([3.0, 5.0, 1.0, 0.0], [1, 2, 3, 4]) == [3.0, 3.0, 1.0, 0.0]


def test_two_workers_equal_one(tiny_llama_program):
    weights, _ = find_weights(tiny_llama_program)
    groups = [g.members for g in tie_groups(weights)]
    by_name = {w.name: w for w in weights}
    calib = _ctx(1).calibration
    one = compute_scores(tiny_llama_program, by_name, groups, ["int2-g16", "int4-g16"], calib, "fisher", 0, workers=1)
    two = compute_scores(tiny_llama_program, by_name, groups, ["int2-g16", "int4-g16"], calib, "fisher", 0, workers=2)
    assert one.keys() == two.keys() and len(one) == 18
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-9, abs=0)


def test_allocation_ties_and_budget(tiny_llama_program, tmp_path):
    p = tiny_llama_program
    _sensitivity(p, tmp_path)
    table = p.annotations[SENSITIVITY]["table"]
    b = np.array(table.bytes)
    budget = int(b[:, 0].sum() + 0.5 * (b[:, 1].sum() - b[:, 0].sum())) + 1000  # room for about half at 4 bits
    r = AllocateBits(AllocateOptions(budget=str(budget), overhead_bytes=1000)).run(p, _ctx())
    plan = p.annotations[PLAN]
    assert r.metrics["predicted_bytes"] <= budget and r.metrics["solver"] == "optimal"
    assert len({plan[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"}) == 1
    assert len({plan[f"model.layers.1.mlp.{x}_proj.weight"] for x in ("gate", "up")}) == 1
    assert len(set(plan.values())) > 1  # a real mix at this budget
    rows = r.metrics["table"]
    assert sum(row["bytes"] for row in rows) + 1000 == r.metrics["predicted_bytes"]
    out = Quantize(QuantizeOptions()).run(p, _ctx())
    assert out.metrics["quantized_bytes"] == sum(row["bytes"] for row in rows if row["format"] != "keep")


def test_allocation_errors(tiny_llama_program, tmp_path):
    p = tiny_llama_program
    _sensitivity(p, tmp_path)
    smallest = int(np.array(p.annotations[SENSITIVITY]["table"].bytes)[:, 0].sum()) + 500
    with pytest.raises(ConfigError, match=rf"infeasible.*smallest artifact.*is {smallest:,} bytes"):
        AllocateBits(AllocateOptions(budget=str(smallest - 1), overhead_bytes=500)).run(p, _ctx())
    AllocateBits(AllocateOptions(budget=str(smallest), overhead_bytes=500)).run(p, _ctx())  # exactly enough
    with pytest.raises(ConfigError, match="no budget"):
        AllocateBits(AllocateOptions()).run(p, _ctx())
    with pytest.raises(ValueError, match="cannot read budget"):
        AllocateOptions(budget="small").validate()


def test_candidate_the_target_cannot_store(tiny_llama_program, tmp_path):
    opts = SensitivityOptions(candidates=["int3-g16", "keep"], cache_dir="", measure_graph=False)
    with pytest.raises(ConfigError, match=r"candidates\[0\].*'int3-g16'.*onnx"):
        QuantSensitivity(opts).run(tiny_llama_program, _ctx())
