"""`distill-attention`: attention transfer into the memory-caching layers, then an optional end-to-end phase.

Stage 1 (LoLCATs-style, teacher-fed per layer): the program runs with every MemoryCachingAttention swapped for
the exact causal softmax attention it replaced, so each layer sees the ORIGINAL model's q, k, v and layer input;
each memory-caching layer is trained to reproduce that layer's exact output (relative MSE before o_proj). Only the
new layers' parameters train; with ``router_loss`` > 0 stage 1 also fits each layer's router to the teacher's
attention mass per memory segment (router_loss.py), which the output MSE reaches only through the selected reads;
with ``memory_loss`` > 0 it fits the layer's weight on each single memory token (router and feature maps) to the
teacher's, and with ``attention_loss`` > 0 the layer's weight on every token, window included (so the memory's
share too). A select layer (memc/nn/selective.py) trains its salience scorer only, on selective_loss.py's
regression (its selection is discrete: the output error gives the scorer no gradient).
Stage 2 (optional): KL of the rewritten model's next-token distribution to the
original's, through the whole network, still training only the new parameters. Window dropout during training
keeps a layer from living off its window alone; the report measures what the memory contributes per layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memc.errors import PassError
from memc.eval.backends import TorchBackend
from memc.eval.text import load_train_text, tokenize
from memc.nn.memory_caching import MemoryCachingAttention
from memc.passes.attention.memory_caching import MC_SITES_KEY, MemoryCachingSite
from memc.nn.selective import SelectiveMemoryAttention
from memc.passes.attention.router_loss import attention_kl, memory_kl, router_kl
from memc.passes.attention.selective_loss import salience_loss
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.program import Program
from memc.schema import option


class ExactAttention(nn.Module):
    """The teacher in a memory-caching layer's place: exact causal softmax over the same q, k, v.

    It keeps the inputs and output of its last call, which stage 1 trains the student layer on.
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.seen: tuple[torch.Tensor, ...] = ()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        self.seen = tuple(t.detach() if t is not None else None for t in (q, k, v, x, out))
        return out


def _swap(gm: nn.Module, target: str, module: nn.Module) -> nn.Module:
    parent_path, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    old = getattr(parent, name)
    setattr(parent, name, module)
    return old


@contextlib.contextmanager
def teacher_mode(gm: nn.Module, sites: list[MemoryCachingSite]) -> Iterator[dict[str, ExactAttention]]:
    """Run the program as the original model (exact attention at every rewritten site), recording each site."""
    teachers = {s.target: ExactAttention(gm.get_submodule(s.target).scale) for s in sites}
    students = {t: _swap(gm, t, m) for t, m in teachers.items()}
    try:
        yield teachers
    finally:
        for t, m in students.items():
            _swap(gm, t, m)


def relative_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||y - t||^2 / ||t||^2: 0 is exact, 1 is as far as predicting zeros."""
    return (y - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


@register_pass
class DistillAttention(Pass):
    """Train the memory-caching layers to reproduce the original attention (teacher-fed), then end to end."""

    name = "distill-attention"
    requires = frozenset({MC_SITES_KEY})
    tolerance = None

    @dataclass
    class Config:
        text: str = option("trainsplit:code", "training text: trainsplit:code | trainsplit:prose | a UTF-8 file")
        steps: int = option(200, "stage 1 (per-layer attention transfer) optimizer steps")
        e2e_steps: int = option(0, "stage 2 (end-to-end KL to the original model) optimizer steps")
        lr: float = option(3e-3, "Adam learning rate of stage 1")
        e2e_lr: float = option(1e-3, "Adam learning rate of stage 2")
        batch: int = option(2, "windows per step")
        seq_len: int = option(1024, "tokens per window (0 = the model's context)")
        window_dropout: float = option(0.1, "training only: probability of hiding each window key but the "
                                            "token's own, so a layer must use its memory")
        router_loss: float = option(0.0, "stage 1: weight of KL(teacher attention mass per memory segment || the "
                                         "layer's router softmax) added to the output error (0 = off)")
        memory_loss: float = option(0.0, "stage 1: weight of KL(teacher attention over single memory tokens || the "
                                         "layer's weight on them, router and feature maps together) added to the "
                                         "output error (0 = off)")
        attention_loss: float = option(0.0, "stage 1: weight of KL(teacher attention || the layer's weights over "
                                            "every token, window and memory, before sparse selection) added to "
                                            "the output error (0 = off)")
        eval_windows: int = option(2, "train-split windows (not trained on) for the before/after layer errors")
        log_every: int = option(10, "record the loss curve every this many steps")

        def validate(self) -> None:
            for name in ("steps", "e2e_steps", "eval_windows", "seq_len"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            for name in ("batch", "log_every"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.lr <= 0 or self.e2e_lr <= 0:
                raise ValueError("lr and e2e_lr must be > 0")
            for name in ("router_loss", "memory_loss", "attention_loss"):
                value = getattr(self, name)
                if not value >= 0.0 or value == float("inf"):
                    raise ValueError(f"{name} must be a finite number >= 0, got {value}")
            if not 0.0 <= self.window_dropout < 1.0:
                raise ValueError(f"window_dropout must be in [0, 1), got {self.window_dropout}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        c = self.config
        if program.source.task != "causal-lm":
            raise PassError(f"{self.path or self.name}: distillation needs a causal LM (input_ids -> logits)")
        sites: list[MemoryCachingSite] = program.annotations[MC_SITES_KEY]
        gm = program.module
        layers = {s.target: gm.get_submodule(s.target) for s in sites}
        if c.e2e_steps and all(isinstance(m, SelectiveMemoryAttention) for m in layers.values()):
            raise PassError(f"{self.option_path('e2e_steps')}: {c.e2e_steps} end-to-end steps, but select layers "
                            "have nothing the end-to-end KL can train (their selection is discrete: the output "
                            "gives the scorer no gradient); set it to 0")
        seq = c.seq_len or program.source.max_seq_len or 0
        if program.source.max_seq_len and seq > program.source.max_seq_len:
            raise PassError(f"{self.option_path('seq_len')}: {seq} > the model's context {program.source.max_seq_len}")
        tokens = self._tokens(program)
        need = seq * (c.batch + c.eval_windows) + 1
        if len(tokens) < need:
            raise PassError(f"{self.option_path('text')}: {c.text!r} has {len(tokens)} tokens; distillation with "
                            f"batch {c.batch}, seq_len {seq} and {c.eval_windows} eval windows needs at least {need}")
        # eval windows come from the end of the text, training windows from the rest: never the same tokens
        eval_ids = torch.from_numpy(tokens[len(tokens) - seq * c.eval_windows:].reshape(c.eval_windows, seq).copy())
        train_tokens = tokens[: len(tokens) - seq * c.eval_windows]
        rng = np.random.default_rng(ctx.seed)
        torch.manual_seed(ctx.seed)

        frozen = [(p, p.requires_grad) for p in gm.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        params = [p for m in layers.values() for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        started = time.perf_counter()
        try:
            before = self._layer_errors(gm, sites, layers, eval_ids) if c.eval_windows else {}
            curve = self._stage1(gm, sites, layers, params, train_tokens, seq, rng, ctx)
            e2e_curve = self._stage2(gm, sites, params, train_tokens, seq, rng, ctx) if c.e2e_steps else []
            after = self._layer_errors(gm, sites, layers, eval_ids) if c.eval_windows else {}
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            for m in layers.values():
                m.eval()
        metrics = {
            "tokens_available": int(len(train_tokens)), "seq_len": seq, "seconds": round(time.perf_counter() - started, 1),
            "layer_error_before": before, "layer_error_after": after, "loss_curve": curve, "e2e_kl_curve": e2e_curve,
        }
        return PassResult(program, True, metrics)

    # -- data ------------------------------------------------------------------------------------------------------
    def _tokens(self, program: Program) -> np.ndarray:
        info = TorchBackend(program).info  # the model's task, vocabulary and tokenizer directory, as eval reads them
        data = load_train_text(self.config.text, self.option_path("text"))
        try:
            ids, _ = tokenize(data, info)
        except Exception as exc:
            raise PassError(f"{self.option_path('text')}: cannot tokenise {self.config.text!r}: {exc}") from None
        return ids

    @staticmethod
    def _batch(tokens: np.ndarray, seq: int, batch: int, rng: np.random.Generator) -> torch.Tensor:
        starts = rng.integers(0, len(tokens) - seq, size=batch)
        return torch.from_numpy(np.stack([tokens[s : s + seq] for s in starts]).astype(np.int64))

    # -- stage 1 ---------------------------------------------------------------------------------------------------
    def _teacher_inputs(self, gm, sites, ids: torch.Tensor) -> tuple[dict[str, tuple], torch.Tensor]:
        with teacher_mode(gm, sites) as teachers, torch.no_grad():
            logits = gm(ids)
        return {t: m.seen for t, m in teachers.items()}, logits

    def _stage1(self, gm, sites, layers, params, tokens, seq, rng, ctx) -> list[dict[str, float]]:
        c = self.config
        if not c.steps:
            return []
        opt = torch.optim.Adam(params, lr=c.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / (c.steps + 1)))
        curve: list[dict[str, float]] = []
        with _window_dropout(layers.values(), c.window_dropout), ctx.progress(c.steps, "distilling attention") as advance:
            for step in range(c.steps):
                seen, _ = self._teacher_inputs(gm, sites, self._batch(tokens, seq, c.batch, rng))
                opt.zero_grad(set_to_none=True)
                losses, kls, mkls, akls = {}, {}, {}, {}
                for target, layer in layers.items():
                    q, k, v, x, out = seen[target]
                    if isinstance(layer, SelectiveMemoryAttention):  # discrete selection: the scorer's own loss
                        loss = salience_loss(layer, q, k, x)
                        loss.backward()
                        losses[target] = float(loss.detach())
                        continue
                    loss = relative_error(layer(q, k, v, x), out)
                    if c.router_loss:
                        kl = router_kl(layer, q, k, x)
                        kls[target] = float(kl.detach())
                        loss = loss + c.router_loss * kl
                    if c.attention_loss:
                        akl = attention_kl(layer, q, k, x)
                        akls[target] = float(akl.detach())
                        loss = loss + c.attention_loss * akl
                    if c.memory_loss:
                        mkl = memory_kl(layer, q, k, x)
                        mkls[target] = float(mkl.detach())
                        loss = loss + c.memory_loss * mkl
                    loss.backward()
                    losses[target] = float(loss.detach())
                self._check_finite(layers, step, "teacher-fed", "lr")
                opt.step()
                sched.step()
                if step % c.log_every == 0 or step == c.steps - 1:
                    point = {"step": step, "loss": sum(losses.values()) / len(losses)}
                    if kls:
                        point["router_kl"] = sum(kls.values()) / len(kls)
                    if mkls:
                        point["memory_kl"] = sum(mkls.values()) / len(mkls)
                    if akls:
                        point["attention_kl"] = sum(akls.values()) / len(akls)
                    curve.append(point)
                advance(1)
        return curve

    def _stage2(self, gm, sites, params, tokens, seq, rng, ctx) -> list[dict[str, float]]:
        c = self.config
        opt = torch.optim.Adam(params, lr=c.e2e_lr)
        layers = [gm.get_submodule(s.target) for s in sites]
        curve: list[dict[str, float]] = []
        with _window_dropout(layers, c.window_dropout), ctx.progress(c.e2e_steps, "distilling end to end") as advance:
            for step in range(c.e2e_steps):
                ids = self._batch(tokens, seq, c.batch, rng)
                _, teacher_logits = self._teacher_inputs(gm, sites, ids)
                opt.zero_grad(set_to_none=True)
                student = gm(ids)
                loss = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                                log_target=True, reduction="batchmean") / seq
                loss.backward()
                self._check_finite({s.target: m for s, m in zip(sites, layers)}, step, "end-to-end", "e2e_lr")
                opt.step()
                if step % c.log_every == 0 or step == c.e2e_steps - 1:
                    curve.append({"step": step, "kl": float(loss.detach())})
                advance(1)
        return curve

    def _check_finite(self, layers: dict[str, nn.Module], step: int, stage: str, lr_option: str) -> None:
        """A non-finite gradient would turn the layer's weights into NaN and the pass would hand on (and a
        distill script would save) a broken model: stop at the first one, naming the layers and the step."""
        bad = sorted(t for t, m in layers.items()
                     if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in m.parameters()))
        if bad:
            raise PassError(
                f"{self.path or self.name}: {stage} distillation diverged at step {step + 1}: non-finite gradients in "
                f"{', '.join(bad)} (variant {self._variant(layers)!r}); nothing is written. Lower "
                f"{self.option_path(lr_option)} or try another variant")

    @staticmethod
    def _variant(layers: dict[str, nn.Module]) -> str:
        return next(iter(layers.values())).cfg.variant

    def _layer_errors(self, gm, sites, layers, ids: torch.Tensor) -> dict[str, dict[str, float]]:
        """Per layer, on teacher-fed eval windows: relative error of the layer and of its window alone, the router's
        KL to the teacher's attention mass per segment and the layer's KL to it over single memory tokens
        (router_loss.py)."""
        seen, _ = self._teacher_inputs(gm, sites, ids)
        errors = {}
        with torch.no_grad():
            for target, layer in layers.items():
                q, k, v, x, out = seen[target]
                layer.eval()
                full = float(relative_error(layer(q, k, v, x), out))
                layer.memory_enabled = False
                window_only = float(relative_error(layer(q, k, v, x), out))
                layer.memory_enabled = True
                if isinstance(layer, SelectiveMemoryAttention):
                    errors[target] = {"error": round(full, 6), "window_only_error": round(window_only, 6),
                                      "salience_mse": round(float(salience_loss(layer, q, k, x)), 6)}
                    continue
                kl = float(router_kl(layer, q, k, x))
                mkl = float(memory_kl(layer, q, k, x))
                akl = float(attention_kl(layer, q, k, x))
                errors[target] = {"error": round(full, 6), "window_only_error": round(window_only, 6),
                                  "router_kl": round(kl, 6), "memory_kl": round(mkl, 6), "attention_kl": round(akl, 6)}
        return errors


@contextlib.contextmanager
def _window_dropout(layers, p: float) -> Iterator[None]:
    """Train mode with window dropout ``p`` on every layer; back to eval mode and no dropout afterwards."""
    saved = []
    for layer in layers:
        saved.append(layer.cfg)
        if not isinstance(layer, SelectiveMemoryAttention):  # its training never runs the forward
            layer.cfg = dataclasses.replace(layer.cfg, window_dropout=p)
        layer.train()
    try:
        yield
    finally:
        for layer, cfg in zip(layers, saved):
            layer.cfg = cfg
            layer.eval()
