"""moe-patterns: task-adaptive expert patterns (PreMoe, arXiv 2505.17639): one kept-expert set per task, the one
closest to the target workload deployed.

Build: route each calibration corpus (train text, one per task or domain) through the graph with moe-calibrate's
``collect``, rank every layer's experts by a criterion (TCESS by default, PreMoe's task-conditioned expected
selection score) and keep the best under the budget: one pattern per corpus, stored with its signature (the
per-layer TCESS vectors) in the annotation ``moe.patterns`` and in the pass report (report.json of the artifact).
A library already on the program, built with the same corpora and settings, is reused instead of rebuilt.
Match: route a sample of the target workload the same way and choose the pattern whose signature is closest, by
cosine similarity of the TCESS vectors on the first MoE layer (PreMoe's retrieval) or averaged over all layers.
Prune: slice every MoE layer to the chosen pattern (exact, as prune-experts does: ``rewrite.keep_experts``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from memc.errors import ConfigError, MemcError, PassError
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.moe.calibrate import (CALIBRATION_KEY, LayerStats, calibration_text, collect, token_windows,
                                       window_inputs)
from memc.passes.moe.detect import SITES_KEY, find_moe_sites
from memc.passes.moe.prune import PRUNED_KEY
from memc.passes.moe.rewrite import keep_experts
from memc.passes.moe.select import check_keep, choose, global_budget, keep_count, scores
from memc.passes.moe.sites import MoESite
from memc.program import Program
from memc.schema import option

PATTERNS_KEY = "moe.patterns"
DEFAULT_CORPORA = ("trainsplit:prose", "trainsplit:code", "trainsplit:vimhelp", "trainsplit:c")
Criterion = Literal["frequency", "soft-frequency", "tcess", "ean", "reap"]


@dataclass
class Pattern:
    """One task's kept experts per layer and the signature it is matched by."""

    name: str
    text: str
    tokens: int
    kept: list[list[int]]
    signature: list[list[float]]  # per layer, the TCESS vector of the corpus (sums to ~top-k)


@dataclass
class PatternLibrary:
    criterion: str
    budget: str
    keep: list[int]  # experts kept per layer
    layers: list[str]  # MoE layer paths the patterns index
    patterns: list[Pattern] = field(default_factory=list)

    def key(self) -> tuple:
        return (self.criterion, self.budget, tuple(self.keep), tuple(self.layers), tuple(p.text for p in self.patterns))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def pattern(self, name: str) -> Pattern:
        return next(p for p in self.patterns if p.name == name)


def pattern_name(spec: str) -> str:
    """``trainsplit:code`` -> ``code``; a file -> its stem."""
    return spec.split(":", 1)[1] if spec.startswith("trainsplit:") else Path(spec).stem


def merge_stats(groups: list[list[LayerStats]]) -> list[LayerStats]:
    """Per layer, the statistics of all groups' tokens together (what one calibration on the mixed text would give)."""
    out = []
    for layers in zip(*groups):
        tokens = [l.trace.shape[0] for l in layers]
        count = sum(l.count for l in layers)
        g_norm = sum(torch.nan_to_num(l.reap) * l.count for l in layers)
        reap = torch.where(count > 0, g_norm / count.clamp(min=1), torch.full_like(count, float("nan")))
        tcess = sum(l.tcess * t for l, t in zip(layers, tokens)) / sum(tokens)
        first = layers[0]
        out.append(LayerStats(first.path, first.num_experts, first.top_k, count, sum(l.soft for l in layers), tcess,
                              sum(l.ean for l in layers), reap, torch.cat([l.trace for l in layers]),
                              torch.cat([l.gates for l in layers])))
    return out


def kept_sets(sites: list[MoESite], stats: list[LayerStats], criterion: str, keep: list[int], budget: str) -> list[list[int]]:
    """Kept expert ids per layer: the best ``keep[l]`` by ``criterion`` (global: the same total, re-spread)."""
    values = [scores(s, criterion) for s in stats]
    counts = global_budget(sites, values, sum(keep)) if budget == "global" else keep
    return [choose(site, v, n) if n < site.num_experts else list(range(n)) for site, v, n in zip(sites, values, counts)]


def cosine(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else 0.0


def similarities(library: PatternLibrary, signature: list[list[float]], match: str) -> dict[str, float]:
    """Cosine similarity of a sample's signature to every pattern's: first MoE layer, or the mean over layers."""
    layers = [0] if match == "first-layer" else range(len(library.layers))
    return {p.name: sum(cosine(signature[l], p.signature[l]) for l in layers) / len(layers) for p in library.patterns}


def best_match(sims: dict[str, float]) -> str:
    """The most similar pattern; ties go to the first in library order (deterministic)."""
    return max(sims, key=lambda name: (sims[name], -list(sims).index(name)))


def signature(stats: list[LayerStats]) -> list[list[float]]:
    return [[round(float(v), 6) for v in l.tcess] for l in stats]


@dataclass
class PatternsOptions:
    corpora: list[str] = option(
        factory=lambda: list(DEFAULT_CORPORA),
        doc="calibration corpora, one pattern each: trainsplit:<domain> (prose, code, vimhelp, c) or UTF-8 files "
            "of training text (never held-out text)",
    )
    target: str = option(
        "", "a sample of the target workload (heldout:<domain>, trainsplit:<domain> or a UTF-8 file): the closest "
            "pattern is chosen and the experts pruned to it; empty: only build and store the library",
    )
    keep: int = option(0, "experts kept per layer (the per-layer average under a global budget); 0: use keep_fraction")
    keep_fraction: float = option(0.5, "fraction of each layer's experts kept; used when keep = 0")
    budget: Literal["uniform", "global"] = option(
        "uniform", "uniform: the same count in every layer; global: the same total, spread by normalised importance")
    criterion: Criterion = option("tcess", "expert ranking of each pattern (TCESS is PreMoe's)")
    match: Literal["first-layer", "all-layers"] = option(
        "first-layer", "signature compared: the first MoE layer's TCESS vector (PreMoe) or the mean cosine over layers")
    windows: int = option(32, "calibration windows per corpus, evenly spaced over its text")
    target_windows: int = option(4, "windows of the target sample routed for matching")
    context: int = option(512, "tokens per window (capped by the model's maximum and the text's length)")
    batch: int = option(4, "windows per forward")

    def validate(self) -> None:
        if self.windows < 1 or self.target_windows < 1 or self.context < 2 or self.batch < 1:
            raise ValueError("windows, target_windows and batch must be >= 1 and context >= 2")
        if self.keep < 0:
            raise ValueError("keep must be >= 0")
        if not self.keep and not 0.0 < self.keep_fraction < 1.0:
            raise ValueError("set keep (experts per layer) or keep_fraction in (0, 1)")
        if len(self.corpora) < 2:
            raise ValueError("give at least two calibration corpora (one pattern each) to choose between")


@register_pass
class MoEPatterns(Pass):
    """Build per-task expert patterns from calibration corpora; prune to the one closest to the target workload."""

    name = "moe-patterns"
    Config = PatternsOptions
    requires = frozenset({SITES_KEY})
    provides = frozenset({SITES_KEY, PATTERNS_KEY})  # and moe.pruned (PRUNED_KEY) when a target prunes
    invalidates = frozenset({CALIBRATION_KEY})
    tolerance = None  # removes experts on purpose; quality is measured by benchmarks/moe_patterns.py

    def _keep(self, sites: list[MoESite]) -> list[int]:
        cfg = self.config
        counts = [keep_count(s, cfg.keep, cfg.keep_fraction) for s in sites]
        for s, n in zip(sites, counts):
            if not s.top_k <= n < s.num_experts:
                raise ConfigError(
                    f"{self.option_path('keep' if cfg.keep else 'keep_fraction')}: keeps {n} of {s.path}'s "
                    f"{s.num_experts} experts; it must keep at least its top-k ({s.top_k}) and fewer than all")
            try:
                check_keep(s, n)
            except PassError as exc:
                raise ConfigError(f"{self.option_path('keep')}: {exc}") from None
        return counts

    def _route(self, program: Program, sites: list[MoESite], data: bytes, windows: int, where: str) -> list[LayerStats]:
        cfg = self.config
        ids = token_windows(program, data, windows, cfg.context, where)
        return collect(program, sites, window_inputs(program, ids, cfg.batch))

    def _texts(self, program: Program) -> list[bytes]:
        """Every calibration corpus, checked (train text only, distinct names) before anything is routed."""
        cfg = self.config
        if program.source.task != "causal-lm":
            raise ConfigError(f"{self.option_path('corpora')}: patterns route text; this model is not a causal LM")
        names = [pattern_name(t) for t in cfg.corpora]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.option_path('corpora')}: two corpora have the same pattern name ({names})")
        return [calibration_text(spec, self.option_path(f"corpora[{i}]")) for i, spec in enumerate(cfg.corpora)]

    def corpus_stats(self, program: Program, sites: list[MoESite]) -> list[list[LayerStats]]:
        """moe-calibrate's statistics of every corpus, per layer."""
        self._keep(sites)
        return [self._route(program, sites, data, self.config.windows, self.option_path(f"corpora[{i}]"))
                for i, data in enumerate(self._texts(program))]

    def library(self, sites: list[MoESite], stats: list[list[LayerStats]]) -> PatternLibrary:
        """One pattern per corpus from its statistics."""
        cfg = self.config
        keep = self._keep(sites)
        library = PatternLibrary(cfg.criterion, cfg.budget, keep, [s.path for s in sites])
        for spec, layer_stats in zip(cfg.corpora, stats):
            library.patterns.append(Pattern(
                pattern_name(spec), spec, int(layer_stats[0].trace.shape[0]),
                kept_sets(sites, layer_stats, cfg.criterion, keep, cfg.budget), signature(layer_stats)))
        return library

    def build(self, program: Program, sites: list[MoESite]) -> PatternLibrary:
        """The library of this pass's corpora and settings (reused from the program when it holds the same one)."""
        cfg = self.config
        keep = self._keep(sites)
        self._texts(program)
        stored: PatternLibrary | None = program.annotations.get(PATTERNS_KEY)
        wanted = (cfg.criterion, cfg.budget, tuple(keep), tuple(s.path for s in sites), tuple(cfg.corpora))
        if stored is not None and stored.key() == wanted:
            return stored
        return self.library(sites, self.corpus_stats(program, sites))

    def choose(self, program: Program, sites: list[MoESite], library: PatternLibrary) -> tuple[str, dict[str, float], int]:
        """(chosen pattern, similarity to every pattern, target tokens routed)."""
        from memc.eval.text import TRAIN_PREFIX, load_text, load_train_text

        cfg = self.config
        where = self.option_path("target")
        try:
            data = load_train_text(cfg.target, where) if cfg.target.startswith(TRAIN_PREFIX) else load_text(cfg.target)
        except ConfigError:
            raise
        except MemcError as exc:  # e.g. a missing file: name the option
            raise ConfigError(f"{where}: {exc}") from None
        stats = self._route(program, sites, data, cfg.target_windows, where)
        sims = similarities(library, signature(stats), cfg.match)
        return best_match(sims), sims, int(stats[0].trace.shape[0])

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        sites: list[MoESite] = program.annotations[SITES_KEY]
        if not sites:
            raise PassError("moe-patterns: the model has no MoE layer (detect-moe found none)")
        library = self.build(program, sites)
        program.annotations[PATTERNS_KEY] = library
        report: dict[str, Any] = {"library": library.to_dict()}
        if not cfg.target:
            return PassResult(program, False, report)
        chosen, sims, tokens = self.choose(program, sites, library)
        ranked = sorted(sims.values(), reverse=True)
        report["match"] = {
            "target": cfg.target, "target_tokens": tokens, "by": f"cosine of TCESS vectors, {cfg.match}",
            "similarities": {k: round(v, 6) for k, v in sims.items()}, "chosen": chosen,
            "margin": round(ranked[0] - ranked[1], 6) if len(ranked) > 1 else math.inf,
            "target_is_held_out": cfg.target.startswith("heldout:"),
        }
        kept = library.pattern(chosen).kept
        freed = sum(keep_experts(program.module, s, ids) for s, ids in zip(sites, kept) if len(ids) < s.num_experts)
        program.annotations[SITES_KEY] = find_moe_sites(program.module)
        program.annotations[PRUNED_KEY] = {
            "uniform": len({len(k) for k in kept}) == 1, "kept": {s.path: ids for s, ids in zip(sites, kept)},
            "experts": {s.path: len(k) for s, k in zip(sites, kept)}, "original": {s.path: s.num_experts for s in sites},
            "pattern": chosen,
        }
        report.update({"pattern": chosen, "bytes_freed": freed, "kept": program.annotations[PRUNED_KEY]["kept"],
                       "experts_after": [len(k) for k in kept]})
        return PassResult(program, True, report)
