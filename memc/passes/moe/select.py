"""Which experts to keep: rank by a calibration criterion, per layer (uniform) or under a global budget."""
from __future__ import annotations

import math

import torch

from memc.errors import PassError
from memc.passes.moe.calibrate import LayerStats
from memc.passes.moe.sites import MoESite

CRITERIA = ("frequency", "soft-frequency", "tcess", "ean", "reap", "random")
_STAT = {"frequency": "count", "soft-frequency": "soft", "tcess": "tcess", "ean": "ean", "reap": "reap"}


def scores(stats: LayerStats, criterion: str) -> torch.Tensor:
    """Importance per expert (float64, higher = keep); never-routed experts score -inf for every criterion."""
    values = getattr(stats, _STAT[criterion]).clone().double()
    values[stats.count == 0] = float("-inf")
    return torch.nan_to_num(values, nan=float("-inf"))


def _ranked(values: torch.Tensor) -> list[int]:
    """Expert ids by descending value, ties broken by id (stable, deterministic)."""
    order = sorted(range(len(values)), key=lambda e: (-float(values[e]), e))
    return order


def keep_count(site: MoESite, keep: int, keep_fraction: float) -> int:
    n = keep if keep else int(math.floor(site.num_experts * keep_fraction + 0.5))
    return n


def check_keep(site: MoESite, n: int) -> None:
    if n >= site.num_experts:
        raise PassError(f"prune-experts: keeping {n} of {site.path}'s {site.num_experts} experts prunes nothing",
                        hint="keep must be < the expert count")
    if n < site.top_k:
        raise PassError(f"prune-experts: keeping {n} experts in {site.path} is fewer than its top-k ({site.top_k}); "
                        f"every token routes to {site.top_k} distinct experts", hint=f"keep >= {site.top_k}")
    if site.groups > 1:
        per, rest = divmod(n, site.groups)
        if rest or per < 2 or per * site.topk_groups < site.top_k:
            raise PassError(
                f"prune-experts: {site.path} routes by {site.groups} expert groups (top-2 sums per group, "
                f"{site.topk_groups} group(s) per token, top-{site.top_k}); keeping {n} experts cannot keep an equal "
                f"number >= 2 per group with {site.top_k} reachable",
                hint=f"keep a multiple of {site.groups} with at least max(2, ceil({site.top_k}/{site.topk_groups})) per group",
            )


def choose(site: MoESite, values: torch.Tensor, n: int) -> list[int]:
    """The ``n`` best experts; for grouped routers the best n/G of every group."""
    if site.groups > 1:
        size, per = site.num_experts // site.groups, n // site.groups
        kept = []
        for g in range(site.groups):
            ids = list(range(g * size, (g + 1) * size))
            kept += [ids[i] for i in _ranked(values[ids])[:per]]
        return sorted(kept)
    return sorted(_ranked(values)[:n])


def random_values(site: MoESite, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + site.layer)
    return torch.rand(site.num_experts, generator=gen, dtype=torch.float64)


def global_budget(sites: list[MoESite], values: list[torch.Tensor], total: int) -> list[int]:
    """Experts per layer under one budget: each layer's scores as shares of its total, best shares kept first,
    every layer keeping at least its top-k."""
    if any(s.groups > 1 for s in sites):
        raise PassError("prune-experts: a global budget cannot keep DeepSeek's groups equal; use budget = \"uniform\"")
    counts = [s.top_k for s in sites]
    if total < sum(counts) or total >= sum(s.num_experts for s in sites):
        raise PassError(f"prune-experts: a global budget of {total} experts must be >= {sum(counts)} (top-k per layer) "
                        f"and < {sum(s.num_experts for s in sites)} (all experts)")
    shares = []
    for v in values:
        finite = torch.where(torch.isfinite(v), v, torch.zeros_like(v)).clamp(min=0)
        shares.append(v / (float(finite.sum()) or 1.0))
    ranked = [_ranked(v) for v in values]
    while sum(counts) < total:
        open_layers = [l for l in range(len(sites)) if counts[l] < sites[l].num_experts]
        best = max(open_layers, key=lambda l: (float(shares[l][ranked[l][counts[l]]]), -l))
        counts[best] += 1
    return counts
