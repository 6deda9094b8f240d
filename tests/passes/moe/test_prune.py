"""prune-experts: pruned == masked reference for every family; selection rules; merge / re-fit determinism."""
from __future__ import annotations

import copy

import pytest
import torch

from memc.capture.inputs import resized_inputs
from memc.errors import PassError
from memc.passes.base import PassContext
from memc.passes.moe.calibrate import CalibrateOptions, MoECalibrate
from memc.passes.moe.detect import DetectMoE, find_moe_sites
from memc.passes.moe.prune import PRUNED_KEY, PruneExperts, PruneOptions
from memc.passes.moe.rewrite import keep_experts, mask_experts
from memc.passes.moe.select import global_budget
from tests.helpers import record_diff
from tests.passes.moe.conftest import MOE_NAMES


def _as_float64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same graph in float64 (dtype constants included), so rounding cannot hide or fake a difference."""
    gm = gm.double()
    for n in gm.graph.nodes:
        n.args = tuple(torch.float64 if a is torch.float32 else a for a in n.args)
        n.kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in n.kwargs.items()}
    gm.recompile()
    return gm


def _out(gm, x):
    with torch.no_grad():
        y = gm(x)
    return y[0] if isinstance(y, (tuple, list)) else y


def _inputs(program, name):
    if name == "handwritten":
        return torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(7))
    return resized_inputs(program, {"batch": 3, "seq": 11}, 7)[0]


@pytest.mark.parametrize("name", MOE_NAMES)
def test_pruned_equals_masked_reference(name, captured):
    program = captured(name)
    sites = find_moe_sites(program.module)
    E = sites[0].num_experts
    kept = [1, 2, 5, 7] if E == 8 else [0, 3]  # DeepSeek: 2 of each group of 4
    ref, pruned = copy.deepcopy(program.module), copy.deepcopy(program.module)
    freed = 0
    for s in sites:
        mask_experts(ref, s, kept)
        freed += keep_experts(pruned, s, kept)
    assert freed == sum(s.expert_bytes for s in sites) // 2 + sum(
        program.module.get_parameter(s.router_weight).numel() * 4 // 2 + (
            program.module.get_parameter(s.router_bias).numel() * 4 // 2 if s.router_bias else 0) + (
            4 * (E - len(kept)) if s.correction_bias else 0) for s in sites)
    x = _inputs(program, name)
    original, want, got = _out(program.module, x), _out(ref, x), _out(pruned, x)
    assert float((original - want).abs().max()) > 1e-2  # dropping experts matters: the check can fail
    f32 = float((want - got).abs().max())
    record_diff(f"pruned vs masked f32 {name}", f32)
    assert f32 <= 1e-6 * max(1.0, float(want.abs().max()))  # float32 rounding of a differently shaped matmul
    after = find_moe_sites(pruned)
    assert [s.num_experts for s in after] == [len(kept)] * len(sites)
    assert [a.expert_bytes * E for a in after] == [s.expert_bytes * len(kept) for s in sites]
    x64 = x.double() if x.is_floating_point() else x
    f64 = float((_out(_as_float64(ref), x64) - _out(_as_float64(pruned), x64)).abs().max())
    record_diff(f"pruned vs masked f64 {name}", f64)
    assert f64 <= 1e-9


def _prune(program, seed=0, **options):
    ctx = PassContext(seed=seed, calibration=[resized_inputs(program, {}, 20 + i) for i in range(2)])
    program = DetectMoE().run(program, ctx).program
    program = MoECalibrate(CalibrateOptions(text="samples")).run(program, ctx).program
    return PruneExperts(PruneOptions(**options)).run(program, ctx)


@pytest.mark.parametrize("criterion", ["frequency", "soft-frequency", "tcess", "ean", "reap"])
def test_criterion_keeps_the_best_ranked_experts(criterion, captured):
    program = captured("olmoe")
    ctx = PassContext(seed=0, calibration=[resized_inputs(program, {}, 20 + i) for i in range(2)])
    program = DetectMoE().run(program, ctx).program
    program = MoECalibrate(CalibrateOptions(text="samples")).run(program, ctx).program
    layers = program.annotations["moe.calibration"].layers
    result = PruneExperts(PruneOptions(keep=2, criterion=criterion)).run(program, ctx)
    stat = {"frequency": "count", "soft-frequency": "soft"}.get(criterion, criterion)
    for layer, kept in zip(layers, result.metrics["kept"].values()):
        values = getattr(layer, stat)
        assert sorted(kept) == kept and len(kept) == 2
        assert min(float(values[k]) for k in kept) >= max(float(values[d]) for d in range(4) if d not in kept)
    assert result.program.annotations[PRUNED_KEY]["uniform"] is True


def test_random_is_seeded_and_needs_no_calibration(captured):
    runs = []
    for seed in (0, 0, 1):
        program = DetectMoE().run(captured("mixtral"), PassContext()).program
        runs.append(PruneExperts(PruneOptions(keep=2, criterion="random")).run(program, PassContext(seed=seed)).metrics["kept"])
    assert runs[0] == runs[1]
    program = DetectMoE().run(captured("mixtral"), PassContext()).program
    with pytest.raises(PassError, match="needs calibration"):
        PruneExperts(PruneOptions(keep=2, criterion="reap")).run(program, PassContext())


def test_merge_and_refit_are_deterministic_and_change_weights(captured):
    states, metrics = [], []
    for _ in range(2):
        res = _prune(captured("qwen3-moe"), keep=2, criterion="reap", merge=True, refit_steps=3, refit_lr=1e-2)
        states.append({k: v.clone() for k, v in res.program.module.state_dict().items()})
        metrics.append(res.metrics)
    assert metrics[0]["kept"] == metrics[1]["kept"] and metrics[0]["merged_into"] == metrics[1]["merged_into"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert metrics[0]["refit"]["kl_after"] < metrics[0]["refit"]["kl_before"]
    plain = _prune(captured("qwen3-moe"), keep=2, criterion="reap").program.module.state_dict()
    key = "model.layers.0.mlp.experts.down_proj"
    assert not torch.equal(plain[key], states[0][key])  # merged experts differ from the kept originals
    assert not torch.equal(plain["model.layers.0.mlp.gate.weight"], states[0]["model.layers.0.mlp.gate.weight"])


def test_refit_of_router_and_experts_trains_the_kept_experts_deterministically(captured):
    runs = []
    for _ in range(2):
        res = _prune(captured("mixtral"), keep=2, criterion="soft-frequency", refit_steps=4, refit_lr=1e-2,
                     refit_scope="router+experts")
        runs.append((res.metrics, {k: v.clone() for k, v in res.program.module.state_dict().items()}))
    (metrics, state), (_, again) = runs
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert metrics["refit"]["scope"] == "router+experts" and metrics["refit"]["kl_after"] < metrics["refit"]["kl_before"]
    router_only = _prune(captured("mixtral"), keep=2, criterion="soft-frequency", refit_steps=4, refit_lr=1e-2)
    plain = router_only.program.module.state_dict()
    experts = [k for k in state if "experts" in k]
    assert experts and all(state[k].shape == plain[k].shape for k in experts)  # same graph, same bytes
    assert all(not torch.equal(state[k], plain[k]) for k in experts)  # router-only leaves the experts alone
    assert router_only.metrics["refit"]["tensors"] < metrics["refit"]["tensors"]


def test_refit_windows_need_calibration_text(captured):
    from memc.errors import ConfigError

    with pytest.raises(ConfigError, match="refit_windows.*samples"):
        _prune(captured("mixtral"), keep=2, criterion="frequency", refit_steps=1, refit_windows=4)


def test_global_budget_spreads_experts_by_importance(captured):
    res = _prune(captured("olmoe"), keep=3, criterion="frequency", budget="global")
    after = res.metrics["experts_after"]
    assert sum(after) == 6 and min(after) >= 2
    assert res.program.annotations[PRUNED_KEY]["uniform"] is (after[0] == after[1])


def test_global_budget_unit():
    from memc.passes.moe.sites import MoESite

    def site(layer):
        return MoESite("m", layer, "r", "w", None, None, 4, 1, 8, "softmax-topk", True, 1.0, 1, 1, "fused", [], [], [],
                       0, "a", "b", "c", "d")

    values = [torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)]
    # layer 0 is one dominant expert; layer 1 is flat: the budget goes to layer 1
    assert global_budget([site(0), site(1)], values, 5) == [1, 4]


def test_deepseek_groups_stay_equal(captured):
    res = _prune(captured("deepseek-v3"), keep=4, criterion="frequency")
    (kept,) = res.metrics["kept"].values()
    assert sum(e < 4 for e in kept) == 2 and sum(e >= 4 for e in kept) == 2
    for keep in (3, 2):  # 3: unequal groups; 2: one per group, but a group's top-2 sum needs two
        with pytest.raises(PassError, match="groups"):
            _prune(captured("deepseek-v3"), keep=keep, criterion="frequency")
