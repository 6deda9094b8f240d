"""The ``quantize`` pass: quantize the program's weights with the allocation plan (or one uniform format)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from memc.errors import ConfigError, PassError
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.moe.calibrate import calibration_text, token_windows, window_inputs
from memc.passes.quant.apply import apply_quantization
from memc.passes.quant.distill import DistillPlan, distill
from memc.program import Program
from memc.quant.formats import Format, parse_format
from memc.quant.gptq import Hessian, gptq
from memc.quant.record import Observer
from memc.quant.rtn import QuantTensor, rtn
from memc.quant.speed import AUTO
from memc.quant.sites import WeightTensor, block_of, find_weights, tie_groups
from memc.schema import option

PLAN = "quant.plan"  # annotation: {tensor name: format name}, set by allocate-bits


@dataclass
class QuantizeOptions:
    format: str = option("", "one format for every quantizable tensor when no allocate-bits plan precedes, e.g. 'int4-g128'")
    method: Literal["rtn", "gptq"] = option("rtn", "rtn: round to nearest; gptq: Hessian-weighted error feedback")
    act_order: bool = option(
        True, "gptq: sweep columns by decreasing Hessian diagonal (groups stay static, so the bytes do not change; "
        "ref-llama at 3 bits per parameter: +3.1% instead of +3.7% per-byte perplexity before distillation)")
    damp: float = option(0.01, "gptq: dampening, as a fraction of the mean Hessian diagonal")
    block_size: int = option(128, "gptq: columns per lazy-update block")
    accuracy_level: int = option(
        0, "onnxruntime MatMulNBits compute: 0 float32 (the artifact matches the torch program to 1e-4); 4 int8 "
        "activations (faster for 4- and 8-bit; then raise target.atol, the artifact no longer matches exactly); -1 "
        "the level measured fastest for each tensor's format (memc.quant.speed; also needs a larger target.atol)"
    )
    keep: list[str] = option(factory=list, doc="tensor names (or name fragments) that stay unquantized")
    distill_steps: int = option(
        0, "Adam steps training the quantized program towards the unquantized one (KL; scales and norm weights, "
        "formats and bytes unchanged; memc.passes.quant.distill); 0 = off")
    distill_scope: Literal["scales", "scales+weights"] = option(
        "scales", "scales: per-group scales + unquantized float parameters; scales+weights: also latent weights whose "
        "codes are re-rounded (straight-through estimator)")
    distill_lr: float = option(2e-3, "peak learning rate of the scale multipliers and norm weights (warm-up, cosine)")
    distill_weight_lr: float = option(1e-2, "peak learning rate of the latent weights, in quantization steps")
    distill_windows: int = option(
        0, "distillation text: 0 = the calibration samples; N = N windows of distill_context tokens of the "
        "[calibration] source (train split), distill_batch per step")
    distill_context: int = option(512, "tokens per distillation window (with distill_windows > 0)")
    distill_batch: int = option(2, "windows per distillation step (with distill_windows > 0)")

    def validate(self) -> None:
        if self.format:
            try:
                parse_format(self.format, "format")
            except ConfigError as exc:  # from_dict prefixes the pipeline entry's key path
                raise ValueError(str(exc)) from None
        if self.accuracy_level not in (AUTO, 0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4 or -1 (per format, measured), got {self.accuracy_level}")
        if self.damp <= 0 or self.block_size < 1:
            raise ValueError("damp must be > 0 and block_size >= 1")
        for name in ("distill_steps", "distill_windows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("distill_lr", "distill_weight_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.distill_context < 2 or self.distill_batch < 1:
            raise ValueError(f"distill_context must be >= 2 and distill_batch >= 1, got {self.distill_context} and "
                             f"{self.distill_batch}")


def resolve_plan(program: Program, opts: QuantizeOptions, weights: list[WeightTensor]) -> dict[str, Format]:
    plan = program.annotations.get(PLAN)
    if plan is None:
        if not opts.format:
            raise ConfigError(
                "quantize: no format: set the pass's `format` option, or put allocate-bits before it to choose one "
                "per tensor"
            )
        plan = {w.name: opts.format for w in weights}
    out = {}
    for w in weights:
        name = plan.get(w.name, "keep")
        if any(k in w.name for k in opts.keep):
            name = "keep"
        fmt = parse_format(name, f"quant.plan[{w.name!r}]")
        if not fmt.keep:
            out[w.name] = fmt
    return out


def rtn_all(program: Program, weights: list[WeightTensor], formats: dict[str, Format]) -> dict[str, QuantTensor]:
    params = dict(program.module.named_parameters(remove_duplicate=False))
    params.update(dict(program.module.named_buffers(remove_duplicate=False)))
    return {w.name: rtn(params[w.targets[0]].detach(), formats[w.name]) for w in weights if w.name in formats}


def gptq_all(
    program: Program, weights: list[WeightTensor], formats: dict[str, Format], calib: list[tuple], opts: QuantizeOptions,
    progress=None,
) -> dict[str, QuantTensor]:
    """Block by block: Hessians of one decoder block's linears, from the program with every earlier block already
    quantized, then that block's tensors; only one block's Hessians are held at a time."""
    gm = program.module
    params = dict(gm.named_parameters(remove_duplicate=False))
    todo = [w for w in weights if w.name in formats]
    stages: dict[int, list[WeightTensor]] = {}
    for w in todo:
        b = block_of(w.name)
        stages.setdefault(-1 if b is None and any(u.kind == "embedding" for u in w.uses) else (10**9 if b is None else b), []).append(w)
    originals = {w.name: params[w.targets[0]].detach().clone() for w in todo}
    out: dict[str, QuantTensor] = {}
    try:
        for key in sorted(stages):
            group = stages[key]
            hess: dict[str, Hessian] = {}
            watch = {u.node: w.name for w in group for u in w.uses if u.kind == "linear"}
            for w in group:
                hess[w.name] = Hessian(w.shape[1])
            if watch:
                obs = Observer(gm, set(watch), on_input=lambda node, x: hess[watch[node]].add(x))
                with torch.no_grad():
                    for sample in calib:
                        obs.run(*sample)
            for w in group:
                h = hess[w.name]
                if h.n == 0:  # read only by embeddings: rows are independent, GPTQ reduces to RTN
                    q = rtn(originals[w.name], formats[w.name])
                else:
                    q = gptq(originals[w.name], h.h, formats[w.name], damp=opts.damp, block=opts.block_size,
                             act_order=opts.act_order)
                out[w.name] = q
                with torch.no_grad():
                    params[w.targets[0]].copy_(q.dequantize(params[w.targets[0]].dtype))
                if progress:
                    progress(1)
    finally:
        with torch.no_grad():
            for w in todo:
                params[w.targets[0]].copy_(originals[w.name])
    return out


@register_pass
class Quantize(Pass):
    """Quantize weights (plan from allocate-bits, or one format) into QuantLinear / QuantEmbedding modules."""

    name = "quantize"
    Config = QuantizeOptions
    invalidates = frozenset({"quant.sensitivity"})
    tolerance = None  # approximate: reports its own byte counts; the target verifies the artifact against it

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        weights, fixed = find_weights(program)
        formats = resolve_plan(program, self.config, weights)
        if not formats:
            return PassResult(program, False, {"quantized_tensors": 0})
        if self.config.method == "gptq":
            if not ctx.calibration:
                raise PassError("quantize: method 'gptq' needs calibration samples ([calibration] num_samples >= 1)")
            with ctx.progress(len(formats), "gptq") as advance:
                quantized = gptq_all(program, weights, formats, ctx.calibration, self.config, advance)
        else:
            quantized = rtn_all(program, weights, formats)
        metrics = {}
        if self.config.distill_steps:
            quantized, metrics["distill"] = self._distill(program, weights, quantized, ctx)
        kept = sum(w.numel * torch.empty(0, dtype=getattr(torch, w.dtype)).element_size()
                   for w in weights if w.name not in formats)
        stored = apply_quantization(program, weights, quantized, self.config.accuracy_level)
        counts: dict[str, int] = {}
        for f in formats.values():
            counts[f.name] = counts.get(f.name, 0) + 1
        return PassResult(program, True, {
            "quantized_tensors": len(quantized), "formats": counts, "method": self.config.method,
            "quantized_bytes": stored, "kept_weight_bytes": kept, "other_bytes": fixed,
            "predicted_weight_bytes": stored + kept + fixed, "tie_groups": len(tie_groups(weights)), **metrics,
        })

    def _distill(self, program: Program, weights, quantized, ctx: PassContext):
        cfg = self.config
        inputs = distill_inputs(program, cfg, ctx, f"{self.name}.distill_windows")
        plan = DistillPlan(cfg.distill_steps, cfg.distill_lr, cfg.distill_scope, ctx.seed, cfg.distill_weight_lr)
        with ctx.progress(cfg.distill_steps, f"distilling ({cfg.distill_scope})") as advance:
            return distill(program, weights, quantized, inputs, plan, advance)


def distill_inputs(program: Program, cfg: QuantizeOptions, ctx: PassContext, where: str) -> list[tuple]:
    """The distillation batches: the calibration samples, or ``distill_windows`` windows of the calibration text."""
    if not cfg.distill_windows:
        if not ctx.calibration:
            raise PassError("quantize: distill_steps needs calibration samples ([calibration] num_samples >= 1) "
                            "or distill_windows > 0")
        return ctx.calibration
    source = ctx.config.calibration.source if ctx.config is not None else "random"
    if source == "random":
        raise ConfigError(f"{where}: windows need calibration text ([calibration] source = \"trainsplit:code\" or a "
                          "file); set distill_windows = 0 to distill on the calibration samples")
    windows = token_windows(program, calibration_text(source, "calibration.source"), cfg.distill_windows,
                            cfg.distill_context, where)
    return window_inputs(program, windows, cfg.distill_batch)
