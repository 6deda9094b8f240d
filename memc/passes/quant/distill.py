"""Post-quantization distillation: after RTN / GPTQ, train the quantized program end to end towards the unquantized
program's next-token distributions (KL on train-split text), keeping every tensor's format, grid and bytes.

Trainable, per quantized tensor: each group's scale, as a multiplier of the quantizer's scale (E2E-QP /
EfficientQAT's end-to-end step), and with ``scope = "scales+weights"`` also a latent weight in units of the
initial quantization step whose codes are re-rounded every step with a straight-through estimator; plus the float
parameters left unquantized (norm weights; kept matrices only with "scales+weights"). Zero points stay the
quantizer's integers: the container stores them as packed integer codes, so a continuous zero point would not
survive storage. At the end scales are rounded to the format's stored dtype (float16 unless ``-s32``), codes are
recomputed with the rounded scales, and the result is an ordinary ``QuantTensor`` with the same shapes and bytes.

The teacher is the program itself with its original float weights (the student's weights are substituted with
``torch.func.functional_call``), so no second copy of the model is needed. Schedule and loss: memc.passes.moe.refit's
(linear warm-up, cosine decay to 10%; KL(teacher || student) per token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from memc.passes.moe.refit import cached_targets, kl_to_teacher, warmup_cosine_lr
from memc.program import Program
from memc.quant.record import first_output
from memc.quant.rtn import _TORCH_DTYPES, QuantTensor
from memc.quant.sites import WeightTensor

Progress = Callable[[int], None]
_TARGET_CACHE_BYTES = 256 * 2**20  # teacher logits (float16) kept up to this size, else recomputed


@dataclass(frozen=True)
class DistillPlan:
    steps: int
    lr: float  # scale multipliers and float parameters (Adam)
    scope: str  # "scales" | "scales+weights"
    seed: int
    weight_lr: float = 1e-2  # latent weights, in units of the initial quantization step
    warmup: float = 0.1  # read by refit's warmup_cosine_lr, as are steps and lr


class _Round(torch.autograd.Function):
    """round() forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


class TrainableQuant(torch.nn.Module):
    """One quantized tensor in training form: w = (codes - zeros) * scale0 * m per group, m trainable; with a latent
    ``u`` (initial step units) the codes are clamp(round_ste(u * scale0 / scale) + zeros)."""

    def __init__(self, q: QuantTensor, latent: bool):
        super().__init__()
        self.fmt, self.shape = q.fmt, q.shape
        rows, blocks = q.scales.shape
        group = q.fmt.group
        self.register_buffer("codes", q.codes.view(rows, blocks, group).to(torch.float32))
        self.register_buffer("zeros", q.zeros.to(torch.float32).unsqueeze(-1))
        self.register_buffer("scale0", q.scales.to(torch.float32).unsqueeze(-1))
        self.mult = torch.nn.Parameter(torch.ones(rows, blocks, 1))
        self.latent = torch.nn.Parameter(self.codes - self.zeros) if latent else None

    def _latent_codes(self, scale: torch.Tensor, rnd: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return torch.clamp(rnd(self.latent * self.scale0 / scale) + self.zeros, 0, self.fmt.qmax)

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.mult

    def weight(self) -> torch.Tensor:
        s = self.scale()
        if self.latent is None:
            q = self.codes
        else:
            q = self._latent_codes(s, _Round.apply)
        rows, cols = self.shape
        return ((q - self.zeros) * s).view(rows, -1)[:, :cols]

    @torch.no_grad()
    def stored(self) -> QuantTensor:
        """The trained tensor as stored: scales rounded to the stored dtype, codes re-rounded with them."""
        scale = self.scale().squeeze(-1).to(_TORCH_DTYPES[self.fmt.scale_dtype])
        zeros = self.zeros.squeeze(-1).to(torch.uint8)
        if self.latent is None:
            codes = self.codes
        else:
            s = scale.to(torch.float32).unsqueeze(-1)
            codes = self._latent_codes(s, torch.round)
        rows = self.shape[0]
        return QuantTensor(self.fmt, self.shape, codes.to(torch.uint8).view(rows, -1), scale, zeros)


def _float_params(program: Program, quantized: set[str], scope: str) -> dict[str, torch.Parameter]:
    """The program's floating-point parameters that stay unquantized: 1-D ones (norm weights) always, kept
    matrices only when the weights train too."""
    out = {}
    for name, p in program.module.named_parameters():
        if name in quantized or not p.is_floating_point():
            continue
        if p.dim() <= 1 or scope == "scales+weights":
            out[name] = p
    return out


def distill(
    program: Program, weights: list[WeightTensor], quantized: dict[str, QuantTensor], inputs: list[tuple],
    plan: DistillPlan, progress: Progress | None = None,
) -> tuple[dict[str, QuantTensor], dict]:
    """Adam on the quantized tensors' scales (and latent weights) and the unquantized float parameters, minimising
    the mean KL to the program with its float weights over batches drawn (seeded) from ``inputs``.

    ``program`` must still hold its original float weights (the teacher); its unquantized float parameters are
    updated in place. Returns the trained tensors (same formats and shapes as ``quantized``) and metrics with the
    mean KL over all ``inputs`` before and after (after: as stored, float16 scales). If training did not lower that
    KL, the quantizer's tensors and the original float parameters are kept (``applied`` False)."""
    gm = program.module
    by_name = {w.name: w for w in weights}
    train = {n: TrainableQuant(q, plan.scope == "scales+weights") for n, q in quantized.items() if n in by_name}
    floats = _float_params(program, set(train), plan.scope)
    # the float weights: the teacher; its logits kept in float16 up to _TARGET_CACHE_BYTES
    target = cached_targets(lambda i: first_output(gm(*inputs[i])), torch.float16, _TARGET_CACHE_BYTES)

    def student(i: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return first_output(torch.func.functional_call(gm, tensors, inputs[i]))

    def mean_kl(tensors: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return sum(float(kl_to_teacher(student(i, tensors), target(i))) for i in range(len(inputs))) / len(inputs)

    with torch.no_grad():
        start = {n: q.dequantize() for n, q in quantized.items() if n in train}
    before = mean_kl(start)
    del start
    mults = [t.mult for t in train.values()]
    latent = [t.latent for t in train.values() if t.latent is not None]
    trained_floats = {n: torch.nn.Parameter(p.detach().clone()) for n, p in floats.items()}
    groups = [{"params": mults + list(trained_floats.values()), "base": plan.lr}]
    if latent:
        groups.append({"params": latent, "base": plan.weight_lr})
    opt = torch.optim.Adam(groups, lr=plan.lr)
    gen = torch.Generator().manual_seed(plan.seed)
    losses = []
    with torch.enable_grad():
        for step in range(plan.steps):
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, plan) * g["base"] / plan.lr
            i = int(torch.randint(len(inputs), (1,), generator=gen))
            opt.zero_grad()
            tensors = {n: t.weight() for n, t in train.items()}
            tensors.update(trained_floats)
            loss = kl_to_teacher(student(i, tensors), target(i))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(1)
    out = {n: t.stored() for n, t in train.items()}
    with torch.no_grad():
        after = mean_kl({**{n: q.dequantize() for n, q in out.items()}, **trained_floats})
    applied = after < before  # training that did not lower the KL (e.g. a too-high rate) is discarded
    if applied:
        with torch.no_grad():
            for n, p in floats.items():  # only now: until here the program's own floats are the teacher's
                p.copy_(trained_floats[n])
    else:
        out = {n: quantized[n] for n in out}
    changed = sum(int((out[n].codes != quantized[n].codes).sum()) for n in out)
    return {**quantized, **out}, {
        "kl_before": before, "kl_after": after, "applied": applied, "steps": plan.steps, "scope": plan.scope, "lr": plan.lr,
        "batches": len(inputs), "tensors": len(out), "float_params": sorted(floats),
        "trained_parameters": sum(t.mult.numel() + (t.latent.numel() if t.latent is not None else 0)
                                  for t in train.values()) + sum(p.numel() for p in floats.values()),
        "codes_changed": changed, "first_losses": losses[:5], "last_losses": losses[-5:],
    }
