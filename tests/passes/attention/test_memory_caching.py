"""memory-caching rewrites each causal site into one MemoryCachingAttention call (Before/Expected structure), is
exact where the layer's math says it must be, and refuses what it cannot rewrite with one clear message."""
from __future__ import annotations

import pytest
import torch

from memc.errors import ConfigError, PassError
from memc.passes.attention.memory_caching import MC_SITES_KEY
from memc.passes.attention.sites import SITES_KEY
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from memc.program import Program
from tests.helpers import captured, LAYERS, token_batch

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _rewritten(source, **options) -> tuple[Program, Program]:
    original = captured(source)
    program = captured(source)
    passes = [create_pass("detect-attention", {}, "pipeline[0]"), create_pass("memory-caching", options, "pipeline[1]")]
    return original, PassManager(passes).run(program, PassContext())


def _mc_calls(program: Program) -> list[torch.fx.Node]:
    return [n for n in program.module.graph.nodes if n.op == "call_module" and n.target.endswith("memory_caching")]


def test_structure_before_and_expected(tiny_llama_dir):
    """Before: one sdpa per layer. Expected: no sdpa; one call_module per layer reading the site's rotated q, its
    k / v before the GQA repeat and the layer input; everything else (projections, rotary, o_proj) unchanged."""
    before = captured(tiny_llama_dir)
    detected = create_pass("detect-attention", {}, "p").run(before, PassContext()).program
    sites = detected.annotations[SITES_KEY]
    expected_args = [(s.q, s.k_heads, s.v_heads, s.hidden) for s in sites]
    linears_before = sum(n.target == torch.ops.aten.linear.default for n in before.module.graph.nodes)
    params_before = {n for n, _ in before.module.named_parameters(remove_duplicate=False)}

    after = create_pass("memory-caching", {"window": 4, "segment": 4}, "p").run(detected, PassContext()).program
    graph = after.module.graph
    calls = _mc_calls(after)
    assert not any(n.target == SDPA for n in graph.nodes)
    assert [n.target for n in calls] == [f"model.layers.{i}.self_attn.memory_caching" for i in range(LAYERS)]
    assert [tuple(a.name if a is not None else None for a in n.args) for n in calls] == expected_args
    assert sum(n.target == torch.ops.aten.linear.default for n in graph.nodes) == linears_before
    assert [s.target for s in after.annotations[MC_SITES_KEY]] == [n.target for n in calls]
    assert SITES_KEY not in after.annotations  # the old sites are gone with the sdpa nodes
    # only the new layers' parameters are new
    new = {n for n, _ in after.module.named_parameters(remove_duplicate=False)} - params_before
    assert new and all(".memory_caching." in n for n in new)


def test_segment_one_reproduces_the_original_model(tiny_llama_dir):
    """One-token segments read back v_j exactly and the initial router logit is q.k_j * scale: softmax attention."""
    original, program = _rewritten(tiny_llama_dir, window=1, segment=1, feature_dim=8, router_bias_init=0.0)
    ids = token_batch(2, 23)["input_ids"]
    want, got = original(ids)[0], program(ids)[0]
    assert float((want - got).abs().max()) < 1e-4


def test_initialised_layer_is_not_worse_than_window_only(tiny_llama_dir):
    """Before distillation the memory already helps (or at worst matches) window-only attention."""
    original, program = _rewritten(tiny_llama_dir, window=4, segment=4, feature_dim=8)
    ids = token_batch(2, 40)["input_ids"]
    want = original(ids)[0]
    with_memory = float((program(ids)[0] - want).pow(2).mean())
    for m in program.module.modules():
        if hasattr(m, "memory_enabled"):
            m.memory_enabled = False
    window_only = float((program(ids)[0] - want).pow(2).mean())
    assert with_memory <= window_only


def test_site_patterns_choose_layers(tiny_llama_dir):
    _, program = _rewritten(tiny_llama_dir, sites=["*.layers.1.*"], window=4, segment=4)
    assert [n.target for n in _mc_calls(program)] == [
        "model.layers.1.self_attn.memory_caching"]
    assert sum(n.target == SDPA for n in program.module.graph.nodes) == LAYERS - 1


def test_pattern_matching_no_site_names_the_option_and_the_sites(tiny_llama_dir):
    with pytest.raises(PassError, match=r"pipeline\[1\]\.sites: \['decoder\.\*'\] match no attention site; the sites "
                                        r"are model\.layers\.0\.self_attn"):
        _rewritten(tiny_llama_dir, sites=["decoder.*"])


def test_window_not_below_context_is_refused(tiny_llama_dir):
    with pytest.raises(PassError, match=r"pipeline\[1\]\.window: 128 >= the model's context of 128 tokens"):
        _rewritten(tiny_llama_dir, window=128)


@pytest.mark.parametrize("option, value", [("segment", 0), ("window", 0), ("feature_dim", 3), ("variant", "dense")])
def test_bad_layer_options_fail_before_model_work(option, value):
    with pytest.raises(ConfigError, match=rf"pipeline\[1\]"):
        create_pass("memory-caching", {option: value}, "pipeline[1]")


def test_bidirectional_encoder_is_refused(tiny_bert_dir):
    with pytest.raises(PassError, match=r"bidirectional \(mask 'padding'\)"):
        _rewritten(tiny_bert_dir)


def test_rewriting_before_detection_is_refused_up_front():
    from memc.passes.manager import check_order

    with pytest.raises(PassError, match=r"requires 'sites.attention'.*add 'detect-attention' before it"):
        check_order([create_pass("memory-caching", {}, "pipeline[0]")], set())


def test_saved_layers_load_back_with_a_cap_but_not_with_other_layer_options(tiny_llama_dir, tmp_path):
    """`weights` restores distilled layers exactly; a cap (max_segments / cap_policy) may be added at deployment,
    any option that changes the trained computation is refused with both values named."""
    from memc.passes.attention.memory_caching import layer_options, save_layer_weights

    opts = {"window": 4, "segment": 4, "feature_dim": 8}
    _, trained = _rewritten(tiny_llama_dir, **opts)
    with torch.no_grad():
        for name, p in trained.module.named_parameters():
            if ".memory_caching." in name:
                p.add_(0.01 * torch.randn_like(p))  # "distilled": differs from a fresh layer
    mc = trained.log[-1].options
    path = tmp_path / "layers.safetensors"
    save_layer_weights(path, trained.module, trained.annotations[MC_SITES_KEY], mc)
    ids = token_batch(1, 21)["input_ids"]
    _, capped = _rewritten(tiny_llama_dir, **opts, max_segments=2, weights=str(path))
    _, same = _rewritten(tiny_llama_dir, **opts, weights=str(path))
    assert torch.equal(same(ids)[0], trained(ids)[0])
    assert capped(ids)[0].shape == trained(ids)[0].shape
    with pytest.raises(PassError, match=r"pipeline\[1\].weights: .* window = 4 there, 8 here"):
        _rewritten(tiny_llama_dir, **{**opts, "window": 8}, weights=str(path))
