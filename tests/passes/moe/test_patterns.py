"""moe-patterns: pattern libraries from calibration corpora, matching a target sample, exact pruning, bad input."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from memc.errors import ConfigError
from memc.passes.base import PassContext, create_pass
from memc.passes.moe.calibrate import collect, window_inputs
from memc.passes.moe.detect import SITES_KEY, DetectMoE, find_moe_sites
from memc.passes.moe.patterns import (PATTERNS_KEY, MoEPatterns, Pattern, PatternLibrary, PatternsOptions, best_match,
                                      merge_stats, similarities)
from memc.passes.moe.prune import PRUNED_KEY
from memc.passes.moe.rewrite import mask_experts
from tests.helpers import captured

EXPERTS = 8
ALPHABETS = {"letters": "abcdefghijklmnopqrstuvwxyz ", "digits": "0123456789 .", "symbols": "{}[]()<>;:=+-*/&|!#"}


@pytest.fixture(scope="module")
def byte_moe(tmp_path_factory) -> Path:
    """A byte-level Qwen3-MoE (vocab 256, 8 experts top-2 renormalised, 2 layers), random weights, fixed seed."""
    import transformers as T

    cfg = T.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_experts=EXPERTS, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=128,
                           initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T.Qwen3MoeForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("byte-moe")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def program(byte_moe):
    p = captured(byte_moe)
    return DetectMoE().run(p, PassContext()).program


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Clearly separated toy corpora (disjoint alphabets), plus a fresh sample of each as a target workload."""
    root = tmp_path_factory.mktemp("toy-corpora")
    files = {}
    for seed, suffix in ((1, ""), (2, "-target")):
        rng = random.Random(seed)
        for name, alphabet in ALPHABETS.items():
            path = root / f"{name}{suffix}.txt"
            path.write_text("".join(rng.choice(alphabet) for _ in range(3000)))
            files[name + suffix] = path
    return files


def fresh(program):
    return program.replace(module=copy.deepcopy(program.module), annotations=dict(program.annotations), log=[])


def options(files, **kw) -> PatternsOptions:
    base = dict(corpora=[str(files[n]) for n in ALPHABETS], windows=4, target_windows=2, context=64, batch=4,
                keep=4)
    return PatternsOptions(**{**base, **kw})


def test_similarity_and_choice_on_crafted_signatures() -> None:
    lib = PatternLibrary("tcess", "uniform", [2, 2], ["a", "b"], [
        Pattern("x", "x", 10, [[0, 1], [0, 1]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        Pattern("y", "y", 10, [[1, 2], [1, 2]], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
    ])
    sample = [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]]  # first layer like x, second layer like y
    first = similarities(lib, sample, "first-layer")
    assert best_match(first) == "x" and first["x"] > 0.99 and first["y"] < 0.2
    both = similarities(lib, sample, "all-layers")
    assert both["x"] == pytest.approx((first["x"] + 0.2425356) / 2, rel=1e-5)
    assert best_match({"x": 0.5, "y": 0.5}) == "x"  # a tie goes to the first pattern, deterministically


def test_merged_statistics_equal_one_calibration_of_all_the_text(program) -> None:
    sites = program.annotations[SITES_KEY]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (3, 16), generator=gen)
    merged = merge_stats([collect(program, sites, window_inputs(program, x, 4)) for x in (a, b)])
    together = collect(program, sites, window_inputs(program, torch.cat([a, b]), 8))
    for m, t in zip(merged, together):
        # float64 sums of float32 values; the grouped experts' matmuls round with the batch's row count (~1e-7)
        for k in ("count", "soft", "tcess", "ean"):
            assert torch.allclose(getattr(m, k), getattr(t, k), rtol=1e-5, atol=1e-9), k
        assert torch.allclose(torch.nan_to_num(m.reap), torch.nan_to_num(t.reap), rtol=1e-5)
        assert torch.equal(m.trace, t.trace)


@pytest.mark.parametrize("target", list(ALPHABETS))
def test_the_target_sample_picks_its_own_corpus_pattern(program, corpora, target) -> None:
    res = MoEPatterns(options(corpora, target=str(corpora[f"{target}-target"]))).run(fresh(program), PassContext())
    match = res.metrics["match"]
    assert match["chosen"] == target, match
    assert match["margin"] > 0 and set(match["similarities"]) == set(ALPHABETS)
    lib = res.program.annotations[PATTERNS_KEY]
    assert [p.name for p in lib.patterns] == list(ALPHABETS)
    assert all(len(k) == 4 for p in lib.patterns for k in p.kept)
    assert len({tuple(map(tuple, p.kept)) for p in lib.patterns}) > 1  # the corpora route differently


def test_prunes_exactly_to_the_chosen_pattern(program, corpora) -> None:
    p = fresh(program)
    res = MoEPatterns(options(corpora, target=str(corpora["digits-target"]))).run(p, PassContext())
    lib = res.program.annotations[PATTERNS_KEY]
    kept = lib.pattern(res.metrics["pattern"]).kept
    assert res.metrics["kept"] == {s.path: k for s, k in zip(program.annotations[SITES_KEY], kept)}
    assert res.program.annotations[PRUNED_KEY]["pattern"] == res.metrics["pattern"]
    assert [s.num_experts for s in find_moe_sites(res.program.module)] == [4, 4]
    ref = copy.deepcopy(program.module)
    for site, ids in zip(program.annotations[SITES_KEY], kept):
        mask_experts(ref, site, ids)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got, full = ref(x)[0], res.program.module(x)[0], program.module(x)[0]
    assert float((full - want).abs().max()) > 1e-3  # pruning changes the output: the comparison can fail
    assert float((want - got).abs().max()) <= 1e-5


def test_a_stored_library_is_reused_and_building_is_deterministic(program, corpora) -> None:
    first = MoEPatterns(options(corpora)).run(fresh(program), PassContext())
    assert not first.changed and "match" not in first.metrics
    again = MoEPatterns(options(corpora)).run(fresh(program), PassContext())
    assert again.metrics["library"] == first.metrics["library"]
    p = fresh(program)
    p.annotations[PATTERNS_KEY] = first.program.annotations[PATTERNS_KEY]
    reused = MoEPatterns(options(corpora)).run(p, PassContext())
    assert reused.program.annotations[PATTERNS_KEY] is first.program.annotations[PATTERNS_KEY]
    other = MoEPatterns(options(corpora, keep=3)).run(p, PassContext())  # other settings: rebuilt
    assert other.program.annotations[PATTERNS_KEY].keep == [3, 3]


@pytest.mark.parametrize("target", ["", "symbols-target"])
def test_runs_in_a_pass_pipeline_with_or_without_a_target(program, corpora, target) -> None:
    from memc.passes.manager import PassManager

    p = fresh(program)
    p.annotations = {}
    opts = options(corpora, target=str(corpora[target]) if target else "")
    out = PassManager([DetectMoE(), MoEPatterns(opts)]).run(p, PassContext())
    assert PATTERNS_KEY in out.annotations and (PRUNED_KEY in out.annotations) == bool(target)
    assert [s.num_experts for s in out.annotations[SITES_KEY]] == ([4, 4] if target else [EXPERTS, EXPERTS])


def test_bad_inputs_name_the_option(program, corpora) -> None:
    files = [str(corpora[n]) for n in ALPHABETS]
    with pytest.raises(ConfigError, match=r"moe-patterns\.corpora\[1\]: unknown corpus 'trainsplit:klingon'"):
        MoEPatterns(options(corpora, corpora=[files[0], "trainsplit:klingon"])).run(fresh(program), PassContext())
    with pytest.raises(ConfigError, match=r"moe-patterns\.corpora\[0\]: 'heldout:code' is held-out"):
        MoEPatterns(options(corpora, corpora=["heldout:code", files[1]])).run(fresh(program), PassContext())
    for keep in (1, EXPERTS):
        with pytest.raises(ConfigError, match=r"moe-patterns\.keep: keeps .* top-k \(2\) and fewer than all"):
            MoEPatterns(options(corpora, keep=keep)).run(fresh(program), PassContext())
    with pytest.raises(ConfigError, match=r"moe-patterns\.target: text file not found"):
        MoEPatterns(options(corpora, target="/nonexistent.txt")).run(fresh(program), PassContext())
    with pytest.raises(ConfigError, match="same pattern name"):
        MoEPatterns(options(corpora, corpora=[files[0], files[0]])).run(fresh(program), PassContext())
    with pytest.raises(ConfigError, match=r"pipeline\[2\].*keep_fraction"):
        create_pass("moe-patterns", {"keep_fraction": 1.5}, "pipeline[2]")
    with pytest.raises(ConfigError, match=r"pipeline\[2\].*at least two"):
        create_pass("moe-patterns", {"corpora": ["trainsplit:code"]}, "pipeline[2]")


def test_shipped_toolchain_is_valid(tmp_path):
    from tests.helpers import captured, REPO_ROOT, run_cli

    rc, out, err = run_cli(["compile", REPO_ROOT / "models" / "ref-moe-domains", "-c",
                            REPO_ROOT / "toolchains" / "moe-patterns.toml", "-o", tmp_path / "o", "--dry-run"])
    assert rc == 0, err
    assert "moe-patterns (corpora=['trainsplit:prose', 'trainsplit:code', 'trainsplit:vimhelp', 'trainsplit:c']" in out
