"""prune-experts: keep the most important experts of every MoE layer (uniform count or a global budget), by a
calibration criterion, optionally merging each dropped expert into its most similar kept one and re-fitting the
kept router rows (and, with refit_scope = "router+experts", the kept experts) to the unpruned model (KL on the
calibration text; ``memc.passes.moe.refit``).

Pure pruning is exact: the pruned program equals the original with the dropped experts' choice scores at -inf
(``memc.passes.moe.rewrite``). Merging and re-fitting change the kept experts / router rows on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from memc.errors import ConfigError, PassError
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.moe.calibrate import CALIBRATION_KEY, MoECalibration, calibration_text, token_windows, window_inputs
from memc.passes.moe.detect import SITES_KEY, find_moe_sites
from memc.passes.moe.graph import get_attr_tensor, set_attr_tensor
from memc.passes.moe.refit import RefitPlan, refit, teacher_model
from memc.passes.moe.rewrite import keep_experts
from memc.passes.moe.select import CRITERIA, check_keep, choose, global_budget, keep_count, random_values, scores
from memc.passes.moe.sites import MoESite
from memc.program import Program
from memc.schema import option

PRUNED_KEY = "moe.pruned"
Criterion = Literal["frequency", "soft-frequency", "tcess", "ean", "reap", "random"]


@dataclass
class PruneOptions:
    keep: int = option(0, "experts kept per layer (or the per-layer average under a global budget); 0: use keep_fraction")
    keep_fraction: float = option(0.0, "fraction of each layer's experts kept (0.5 = half pruned); used when keep = 0")
    budget: Literal["uniform", "global"] = option(
        "uniform", "uniform: the same count in every layer; global: the same total, spread by normalised importance"
    )
    criterion: Criterion = option("reap", f"importance: {', '.join(CRITERIA)} (all but random need moe-calibrate)")
    merge: bool = option(False, "merge each dropped expert into its most similar kept one (usage-weighted average)")
    refit_steps: int = option(0, "Adam steps re-fitting the pruned model to the unpruned one (KL); 0 = off")
    refit_lr: float = option(1e-3, "peak learning rate of the re-fit (linear warm-up, cosine decay to 10%)")
    refit_scope: Literal["router", "router+experts"] = option(
        "router", "what the re-fit trains: the kept router rows, or the kept router rows and the kept experts' weights"
    )
    refit_windows: int = option(
        0, "re-fit text: 0 = the calibration windows; N = N windows of refit_context tokens of the calibration text"
    )
    refit_context: int = option(1024, "tokens per re-fit window (with refit_windows > 0)")

    def validate(self) -> None:
        if self.keep < 0 or self.refit_steps < 0 or self.refit_windows < 0:
            raise ValueError("keep, refit_steps and refit_windows must be >= 0")
        if self.refit_context < 2:
            raise ValueError("refit_context must be >= 2")
        if not self.keep and not 0.0 < self.keep_fraction < 1.0:
            raise ValueError("set keep (experts per layer) or keep_fraction in (0, 1)")
        if self.keep and self.keep_fraction:
            raise ValueError("set only one of keep and keep_fraction")
        if self.refit_lr <= 0:
            raise ValueError("refit_lr must be > 0")


def _expert_rows(gm: torch.fx.GraphModule, site: MoESite) -> list[list[str]]:
    """Per expert, the attribute names holding its weights (fused: the shared 3-D tensors, row e)."""
    if site.experts_form == "fused":
        return [site.expert_params for _ in range(site.num_experts)]
    return [[t for t in site.expert_params if t.startswith(m + ".")] for m in site.expert_modules]


def _expert_vector(gm, site: MoESite, e: int) -> torch.Tensor:
    names = _expert_rows(gm, site)[e]
    parts = [get_attr_tensor(gm, t)[e] if site.experts_form == "fused" else get_attr_tensor(gm, t) for t in names]
    return torch.cat([p.detach().double().flatten() for p in parts])


def merge_dropped(gm, site: MoESite, kept: list[int], usage: torch.Tensor) -> dict[int, int]:
    """Average each dropped expert into the kept expert with the most similar weights (cosine), weighted by
    calibration usage (selection count + 1). Returns dropped id -> kept id."""
    vecs = torch.stack([_expert_vector(gm, site, e) for e in range(site.num_experts)])
    vecs = torch.nn.functional.normalize(vecs, dim=1)
    into: dict[int, int] = {}
    for d in range(site.num_experts):
        if d not in kept:
            sims = [(float(vecs[d] @ vecs[m]), -m) for m in kept]
            into[d] = -max(sims)[1]
    weight = usage.double() + 1.0
    for m in kept:
        group = [m] + [d for d, t in into.items() if t == m]
        if len(group) == 1:
            continue
        w = weight[group] / weight[group].sum()
        if site.experts_form == "fused":
            for t in site.expert_params:
                full = get_attr_tensor(gm, t).detach().clone()
                full[m] = sum(float(wi) * full[g].double() for wi, g in zip(w, group)).to(full.dtype)
                set_attr_tensor(gm, t, full)
        else:
            rows = _expert_rows(gm, site)
            for j, t in enumerate(rows[m]):
                merged = sum(float(wi) * get_attr_tensor(gm, rows[g][j]).detach().double() for wi, g in zip(w, group))
                set_attr_tensor(gm, t, merged.to(get_attr_tensor(gm, t).dtype))
    return into


@register_pass
class PruneExperts(Pass):
    """Keep the most important experts per MoE layer (exact slicing; optional merge and router re-fit)."""

    name = "prune-experts"
    Config = PruneOptions
    requires = frozenset({SITES_KEY})
    provides = frozenset({SITES_KEY, PRUNED_KEY})
    invalidates = frozenset({CALIBRATION_KEY})
    tolerance = None  # removes experts on purpose; quality is measured by memc eval / benchmarks/moe_pruning.py

    def plan(self, program: Program, ctx: PassContext) -> list[list[int]]:
        """Kept expert ids per layer; every check happens here, before the graph is touched."""
        cfg = self.config
        sites: list[MoESite] = program.annotations[SITES_KEY]
        if not sites:
            raise PassError("prune-experts: the model has no MoE layer (detect-moe found none); nothing to prune")
        calib: MoECalibration | None = program.annotations.get(CALIBRATION_KEY)
        needs = cfg.criterion != "random" or cfg.merge or cfg.refit_steps
        if needs and calib is None:
            raise PassError(
                f"prune-experts: criterion {cfg.criterion!r}"
                + (" with merge / refit" if cfg.criterion == "random" else "")
                + " needs calibration statistics", hint="add a moe-calibrate pass before prune-experts",
            )
        if calib is not None and [l.path for l in calib.layers] != [s.path for s in sites]:
            raise PassError("prune-experts: the calibration statistics are of other MoE layers; recalibrate")
        values = [random_values(s, ctx.seed) if cfg.criterion == "random" else scores(calib.layers[i], cfg.criterion)
                  for i, s in enumerate(sites)]
        counts = [keep_count(s, cfg.keep, cfg.keep_fraction) for s in sites]
        if cfg.budget == "global":
            for s, n in zip(sites, counts):
                check_keep(s, n)
            counts = global_budget(sites, values, sum(counts))
        for s, n in zip(sites, counts):
            if cfg.budget == "uniform" or n < s.num_experts:
                check_keep(s, n)
        return [choose(s, v, n) if n < s.num_experts else list(range(n)) for s, v, n in zip(sites, values, counts)]

    def refit_inputs(self, program: Program, calib: MoECalibration) -> list[tuple]:
        """The re-fit batches: the calibration windows, or ``refit_windows`` fresh windows of the same text."""
        cfg = self.config
        if not cfg.refit_windows:
            return calib.inputs
        where = f"{self.name}.refit_windows"
        if calib.text == "samples":
            raise ConfigError(f"{where}: the calibration used [calibration] samples, which have no text to draw "
                              "windows from; set refit_windows = 0 to re-fit on the samples")
        windows = token_windows(program, calibration_text(calib.text, where), cfg.refit_windows, cfg.refit_context, where)
        return window_inputs(program, windows, 1)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        sites: list[MoESite] = program.annotations[SITES_KEY]
        kept = self.plan(program, ctx)
        calib: MoECalibration | None = program.annotations.get(CALIBRATION_KEY)
        gm = program.module
        refit_inputs = self.refit_inputs(program, calib) if cfg.refit_steps else None
        teacher = teacher_model(gm) if cfg.refit_steps else None
        merged: dict[str, dict[int, int]] = {}
        freed = 0
        for site, ids in zip(sites, kept):
            if len(ids) == site.num_experts:
                continue
            if cfg.merge:
                merged[site.path] = merge_dropped(gm, site, ids, calib.layers[site.layer].count)
            freed += keep_experts(gm, site, ids)
        new_sites = find_moe_sites(gm)
        metrics: dict[str, Any] = {
            "criterion": cfg.criterion, "budget": cfg.budget, "bytes_freed": freed,
            "experts_before": [s.num_experts for s in sites], "experts_after": [len(k) for k in kept],
            "kept": {s.path: ids for s, ids in zip(sites, kept)},
        }
        if merged:
            metrics["merged_into"] = {p: {str(d): m for d, m in v.items()} for p, v in merged.items()}
        if teacher is not None:
            plan = RefitPlan(cfg.refit_steps, cfg.refit_lr, cfg.refit_scope, ctx.seed)
            with ctx.progress(cfg.refit_steps, f"re-fitting ({cfg.refit_scope})") as advance:
                metrics["refit"] = refit(gm, teacher, new_sites, refit_inputs, plan, advance)
            del teacher
        program.annotations[SITES_KEY] = new_sites
        program.annotations[PRUNED_KEY] = {
            "uniform": len({len(k) for k in kept}) == 1, "kept": metrics["kept"],
            "experts": {s.path: len(k) for s, k in zip(sites, kept)}, "original": {s.path: s.num_experts for s in sites},
        }
        return PassResult(program, True, metrics)
