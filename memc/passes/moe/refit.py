"""Re-fitting a pruned MoE program to the unpruned one: KL(unpruned || pruned) of the next-token distribution on
calibration (train-split) text, by Adam on the kept router rows and, when asked, the kept experts' weights.

Pruning removes experts the router had been sending a share of the tokens to; the kept router rows and experts
never learned to cover them. Re-fitting the router alone can only redistribute those tokens; re-fitting the kept
experts too lets them absorb the dropped experts' function (the same distillation objective, more parameters).
Both train only parameters the pruned Program already has: the graph, its shapes and its bytes do not change.
Training runs on the grouped-experts form (``memc.passes.moe.grouped``): same values, several times faster.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule

from memc.passes.moe.graph import get_attr_tensor, set_attr_tensor
from memc.passes.moe.grouped import grouped_form
from memc.passes.moe.sites import MoESite
from memc.quant.record import first_output

Progress = Callable[[int], None]
_TARGET_CACHE_BYTES = 512 * 2**20  # teacher distributions kept in memory up to this size, else recomputed


@dataclass(frozen=True)
class RefitPlan:
    steps: int
    lr: float
    scope: str  # "router" | "router+experts"
    seed: int
    warmup: float = 0.1  # fraction of the steps with a linear warm-up; cosine decay to 10% after it


def teacher_model(gm: GraphModule) -> GraphModule:
    """A frozen copy of the unpruned graph (grouped form) that supplies the target distributions."""
    teacher, _ = grouped_form(copy.deepcopy(gm))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def refit_targets(sites: list[MoESite], scope: str) -> list[str]:
    """Attribute names trained: the router rows (+ biases) and, for ``router+experts``, every expert tensor."""
    names = [t for s in sites for t in (s.router_weight, s.router_bias) if t]
    if scope == "router+experts":
        names += [t for s in sites for t in s.expert_params]
    return list(dict.fromkeys(names))


def cached_targets(compute: Callable[[int], torch.Tensor], store: torch.dtype,
                   cap_bytes: int = _TARGET_CACHE_BYTES) -> Callable[[int], torch.Tensor]:
    """``i -> compute(i)`` as float32 (the teacher's logits for batch i, computed without grad), each kept in
    ``store`` dtype while all kept ones fit in ``cap_bytes``, else recomputed when asked again."""
    cache: dict[int, torch.Tensor] = {}

    def target(i: int) -> torch.Tensor:
        if i in cache:
            return cache[i].float()
        with torch.no_grad():
            out = compute(i).to(store)
        if (len(cache) + 1) * out.numel() * out.element_size() <= cap_bytes:
            cache[i] = out
        return out.float()

    return target


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    logq = student.float().log_softmax(-1)
    logp = teacher.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def warmup_cosine_lr(step: int, plan: RefitPlan) -> float:
    warm = max(1, int(plan.steps * plan.warmup))
    if step < warm:
        return plan.lr * (step + 1) / warm
    t = (step - warm) / max(1, plan.steps - warm)
    return plan.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def refit(gm: GraphModule, teacher: GraphModule, sites: list[MoESite], inputs: list[tuple], plan: RefitPlan,
          progress: Progress | None = None) -> dict[str, float]:
    """Adam on the chosen tensors of ``gm`` (the pruned graph) minimising the mean KL to ``teacher`` over batches
    drawn (seeded) from ``inputs``; returns the mean KL over all ``inputs`` before and after."""
    student, _ = grouped_form(gm)  # shares gm's parameters
    names = refit_targets(sites, plan.scope)
    params = [get_attr_tensor(gm, t) for t in names]
    flags = {id(p): p.requires_grad for p in gm.parameters()}
    target = cached_targets(lambda i: first_output(teacher(*inputs[i])), torch.float32)

    def mean_kl() -> float:
        with torch.no_grad():
            return sum(float(kl_to_teacher(first_output(student(*inputs[i])), target(i))) for i in range(len(inputs))) / len(inputs)

    before = mean_kl()
    for p in gm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=plan.lr)
    gen = torch.Generator().manual_seed(plan.seed)
    try:
        with torch.enable_grad():
            for step in range(plan.steps):
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine_lr(step, plan)
                i = int(torch.randint(len(inputs), (1,), generator=gen))
                opt.zero_grad()
                loss = kl_to_teacher(first_output(student(*inputs[i])), target(i))
                loss.backward()
                opt.step()
                if progress is not None:
                    progress(1)
    finally:
        for p in gm.parameters():
            p.requires_grad_(flags.get(id(p), False))
        for t, p in zip(names, params):
            set_attr_tensor(gm, t, p.detach())
    after = mean_kl()
    return {"kl_before": before, "kl_after": after, "steps": plan.steps, "scope": plan.scope,
            "tensors": len(names), "parameters": sum(p.numel() for p in params)}
