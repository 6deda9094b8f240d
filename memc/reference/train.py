"""Train a reference model once, reproducibly: ``python -m memc.reference.train ref-llama --minutes 28``.

Training stops after a fixed number of steps (derived from --minutes and the speed measured on this
machine, or given with --steps), never on wall time, so a rerun with the same seed and minutes is the
same run. Weights train in float32 under bfloat16 autocast (1.4x faster here) and are saved in
bfloat16 so a checkpoint stays under 10 MB.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import AutoModelForCausalLM, PreTrainedModel

from memc.reference import corpus, metrics, tokenizer
from memc.reference.models import STEPS_PER_MINUTE, TRAIN, TrainSettings, model_config


def sample_batch(rng: np.random.Generator, streams: dict[str, np.ndarray], s: TrainSettings) -> torch.Tensor:
    """(batch, context + 1) token windows; each row's domain is drawn by s.domain_weights, or with
    P(prose) = prose_fraction between the two stdlib domains."""
    rows = []
    names = [d for d, _ in s.domain_weights]
    weights = np.array([w for _, w in s.domain_weights], np.float64)
    for _ in range(s.batch_size):
        if names:
            data = streams[names[int(rng.choice(len(names), p=weights / weights.sum()))]]
        else:
            data = streams["prose" if rng.random() < s.prose_fraction else "code"]
        start = int(rng.integers(0, len(data) - s.context - 1))
        rows.append(data[start : start + s.context + 1])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def lr_at(step: int, steps: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: PreTrainedModel, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are left alone)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)


def train_step(
    model: PreTrainedModel, batch: torch.Tensor, moe: bool, autocast: bool = True
) -> tuple[torch.Tensor, float]:
    """Next-token cross-entropy (plus the load-balancing loss for MoE); returns (total loss, CE)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch[:, :-1], output_router_logits=moe or None)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
    loss = ce + model.config.router_aux_loss_coef * out.aux_loss if moe else ce
    return loss, ce.item()


def train(name: str, steps: int, seed: int, out: Path, minutes: float | None, command: str) -> dict:
    """Train `name` for exactly `steps` steps and save the bf16 checkpoint with its train_config.json."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    s = TRAIN[name]
    model = AutoModelForCausalLM.from_config(model_config(name))
    moe = getattr(model.config, "num_experts", None) is not None
    opt = make_optimizer(model, s)
    tok = tokenizer.train_tokenizer(s.tokenizer_vocab, s.domains, s.tokenizer_sample_bytes) if s.tokenizer_vocab else None
    if tok is not None and len(tok) != model.config.vocab_size:
        raise RuntimeError(f"the tokenizer has {len(tok)} ids but the model's vocabulary is {model.config.vocab_size}")
    lengths = tokenizer.byte_lengths(tok)
    streams = {d: tokenizer.encode(corpus.train_bytes(d), tok) for d in s.domains}
    held = {d: tokenizer.encode(corpus.held_out_bytes(d), tok) for d in s.domains}
    history, t0, cpu0 = [], time.perf_counter(), time.process_time()
    columns = [TextColumn(name), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task(name, total=steps, info="")
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, s)
            model.train()
            batch = sample_batch(rng, streams, s)
            loss, ce = train_step(model, batch, moe, s.autocast)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tok_s = (step + 1) * s.batch_size * s.context / (time.perf_counter() - t0)
            train_bpb = ce * batch[:, 1:].numel() / math.log(2) / metrics.target_bytes(batch, lengths)
            info = f"loss {train_bpb:.3f} bits/byte  {tok_s:,.0f} tok/s"
            if (step + 1) % s.eval_every == 0 or step + 1 == steps:
                model.eval()
                bpb = {d: metrics.quick_bits_per_byte(model, held[d], lengths, s.eval_windows, s.context, s.autocast)
                       for d in held}
                history.append({"step": step + 1, "train_bits_per_byte": round(train_bpb, 4), **bpb})
                bar.console.log(json.dumps(history[-1]))
            bar.update(task, advance=1, info=info)
            if not bar.console.is_terminal and (step + 1) % 25 == 0:
                bar.console.log(f"step {step + 1}/{steps} {info}")  # a live log when writing to a file
    elapsed = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(out)
    train_config = {
        "model": name, "command": command, "seed": seed, "steps": steps, "minutes_requested": minutes,
        "minutes_elapsed": round(elapsed / 60, 2), "cpu_minutes": round((time.process_time() - cpu0) / 60, 2), "tokens_seen": steps * s.batch_size * s.context,
        "tokens_per_s": round(steps * s.batch_size * s.context / elapsed),
        "params": sum(p.numel() for p in model.parameters()), "settings": s.to_dict(),
        "precision": f"fp32 weights{', bf16 autocast' if s.autocast else ''}; saved as bf16", "threads": 1,
        "tokenizer": tokenizer.describe(tok) + (" trained on the train split" if tok is not None else ""),
        "train_tokens": {d: len(t) for d, t in streams.items()},
        "corpus": {"split_hash": corpus.split_hash(s.domains), "domains": list(s.domains),
                   "held_out_mod": {d: corpus.HELD_OUT_MOD[d] for d in s.domains}, **corpus.summary(s.domains)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "history": history,
    }
    (out / "train_config.json").write_text(json.dumps(train_config, indent=1) + "\n")
    return train_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(TRAIN))
    p.add_argument("--minutes", type=float, help="budget; converted to steps at the measured speed")
    p.add_argument("--steps", type=int, help="exact step count (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-metrics", action="store_true", help="skip the full held-out measurement")
    a = p.parse_args(argv)
    if a.steps is None and a.minutes is None:
        p.error("give --minutes or --steps")
    steps = a.steps if a.steps is not None else max(1, round(a.minutes * STEPS_PER_MINUTE[a.name]))
    command = "python -m memc.reference.train " + " ".join(argv if argv is not None else sys.argv[1:])
    train(a.name, steps, a.seed, a.out, a.minutes, command)
    if not a.no_metrics:
        metrics.main([str(a.out)])


if __name__ == "__main__":
    main()
