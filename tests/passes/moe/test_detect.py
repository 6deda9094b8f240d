"""detect-moe on tiny configs of every MoE family, the hand-written ModuleList MoE, and dense models (no sites)."""
from __future__ import annotations

import json

import pytest

from memc.passes.base import PassContext
from memc.passes.moe.detect import SITES_KEY, DetectMoE, find_moe_sites
from memc.passes.moe.graph import get_attr_tensor
from tests.helpers import captured, run_cli
from tests.passes.moe.conftest import MOE_NAMES

# family -> (layers, E, k, score, renormalize, scaling, groups, form, router bias, correction bias, shared)
EXPECTED = {
    "mixtral": (2, 4, 2, "softmax-topk", True, 1.0, 1, "fused", False, False, False),
    "qwen2-moe": (2, 4, 2, "softmax-topk", False, 1.0, 1, "fused", False, False, True),
    "qwen3-moe": (2, 4, 2, "softmax-topk", False, 1.0, 1, "fused", False, False, False),
    "olmoe": (2, 4, 2, "softmax-topk", False, 1.0, 1, "fused", False, False, False),
    "deepseek-v3": (1, 8, 2, "sigmoid", True, 2.5, 2, "fused", False, True, True),
    "gpt-oss": (2, 4, 2, "topk-softmax", True, 1.0, 1, "fused", True, False, False),
    "handwritten": (2, 4, 2, "softmax-topk", True, 1.0, 1, "modulelist", False, False, False),
}


@pytest.mark.parametrize("name", MOE_NAMES)
def test_every_family_is_detected(name, captured):
    program = captured(name)
    result = DetectMoE().run(program, PassContext())
    sites = result.program.annotations[SITES_KEY]
    layers, E, k, score, renorm, scale, groups, form, bias, corr, shared = EXPECTED[name]
    assert len(sites) == layers
    for s in sites:
        assert (s.num_experts, s.top_k, s.score, s.renormalize, s.groups, s.experts_form) == (E, k, score, renorm, groups, form)
        assert s.scaling == pytest.approx(scale)
        assert (s.router_bias is not None, s.correction_bias is not None, bool(s.shared_modules)) == (bias, corr, shared)
        assert tuple(get_attr_tensor(program.module, s.router_weight).shape) == (E, s.hidden_size)
        for t in s.expert_params:  # every expert tensor belongs to the block and has the expert axis first
            assert t.startswith(s.path + ".")
            if form == "fused":
                assert get_attr_tensor(program.module, t).shape[0] == E
        if form == "modulelist":
            assert s.expert_modules == [f"{s.path}.experts.{i}" for i in range(E)]
    if name == "deepseek-v3":
        assert sites[0].path == "model.layers.1.mlp" and sites[0].topk_groups == 1  # layer 0 is dense
    if name == "gpt-oss":
        assert program.source.details["attention"] == "eager"  # no sdpa in transformers: eager fallback
        assert any(t.endswith("down_proj_bias") for t in sites[0].expert_params)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_no_false_positives_on_dense_models(name, tiny_hf):
    assert find_moe_sites(captured(tiny_hf(name)).module) == []


def test_inspect_prints_moe_table_and_json(tiny_hf):
    rc, out, err = run_cli(["inspect", tiny_hf("qwen2-moe")])
    assert rc == 0, err
    assert "MoE layers (2)" in out and "model.layers.1.mlp" in out and "shared_expert" in out
    rc, out, err = run_cli(["inspect", tiny_hf("qwen2-moe"), "--json"])
    rows = json.loads(out)["moe_layers"]
    assert [r["experts"] for r in rows] == [4, 4] and rows[0]["score"] == "softmax-topk"
    rc, out, err = run_cli(["inspect", tiny_hf("llama"), "--json"])
    assert rc == 0 and json.loads(out)["moe_layers"] == []
