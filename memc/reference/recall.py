"""Train the recall model (models/ref-llama-recall), in four runs (each continuation starts from the previous
run's checkpoint):

1. ``python -m memc.reference.recall --steps 1400 --out RUN1 --no-metrics``
2. ``python -m memc.reference.recall --steps 700 --init RUN1 --lr 1.5e-3 --seed 1 --out RUN2 --no-metrics``
   (the previous model: 0.73-0.79 token accuracy; it copied every one-letter value token and 7% of the
   multi-letter ones, 'sg', 'ep', with its copy heads on the right source at p = 0.999)
3. ``python -m memc.reference.recall --steps 1500 --init RUN2 --lr 1.5e-3 --seed 2 --repeat-share 0.5
   --out RUN3 --snapshots SNAP3 --no-metrics``, stopped after its step-500 snapshot SNAP3/step-500 (copy windows
   of train and value tokens mixed in: multi-letter tokens 7% -> 23%, too slow)
4. ``python -m memc.reference.recall --steps 1100 --init SNAP3/step-500 --lr 1.5e-3 --seed 3 --pairs 24
   --repeat-share 0.25 --out models/ref-llama-recall`` (24 planted pairs a window: three times the answer tokens
   per step; this writes metrics.json too, through memc.reference.recall_metrics)

ref-llama never had to copy a random string, so it is at chance on ``memc eval --recall`` and recall cannot be
judged on it; fine-tuning it on the curriculum below stayed at chance for 360-640 steps (~400 tok/s on the
shared cores). This trains a small Llama from scratch instead (models.ref_llama_recall_config: 2 layers, hidden
128, ref-llama's BPE tokenizer and vocabulary) on TRAIN split text only (never held-out): repeated runs of random
train tokens, then key -> value pairs planted in the probe's exact format (the probe's own `make_pair` /
`splice`), several per window (multi-query), each queried a drawn number of tokens later, in windows and
distances that grow up to 1024 / 900 tokens; the continuation trains on that last stage only. Plain next-token
loss did not form the copying circuit in the time available (9% on repeated random tokens after 600 steps), so
attention is supervised (attention_loss) and the residual is split (split_residual). The filler keeps a
next-token loss, so the model is also a (weak) code LM. Step-based, fixed seed, one thread, float32, saved in
bf16 like ref-llama.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import AutoModelForCausalLM, PreTrainedModel

from memc.eval.recall import VALUE_LEN, _trial, _word, make_pair, splice
from memc.reference import corpus, metrics, models, tokenizer
from memc.reference.models import CONTEXT
from memc.reference.train import lr_at, make_optimizer

BASE = Path(__file__).resolve().parents[2] / "models" / "ref-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Stage:
    """From `start` (a fraction of the steps) on: windows of `context` tokens holding `pairs` planted pairs,
    each queried after up to `max_distance` filler tokens; or, with pairs = 0, a warm-up for the copying
    heads: a run of max_distance train tokens repeated to fill the window (every repeat is a copy target)."""

    start: float
    context: int
    max_distance: int
    pairs: int


@dataclass(frozen=True)
class RecallSettings:
    # batch = tokens_per_step // context (at least 1): small steps, many of them, since forming the copying heads
    # takes optimiser steps more than tokens
    tokens_per_step: int = 1024
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # This machine's CPU has AVX2 but no AVX512-BF16: a bf16 autocast matmul measured 17x slower than fp32,
    # so the run is fp32 throughout (ref-llama's bf16 autocast was ~1.4x faster on the CPU that trained it).
    bf16_autocast: bool = False
    prose_fraction: float = 0.06  # as ref-llama
    # Filler carries the LM loss (no separate plain windows: they would cost steps). The head runs on every
    # answer token and on this share of the other positions, which saves most of the 4,096-way head's cost.
    lm_fraction: float = 0.25
    answer_weight: float = 4.0  # loss weight of a queried value token or closing quote (an LM token: 1)
    attention_weight: float = 1.0  # weight of attention_loss (0: next-token loss only)
    attention_offsets: tuple[int, ...] = (1, 2, 3, 4)  # layer 0, head h attends offsets[h] tokens back
    copy_heads: tuple[int, ...] = (0, 1, 2)  # layer 1 heads supervised to attend to each copy's source
    token_dims: int = 64  # see split_residual (0: off)
    # In a pair stage, this share of the windows are repeat windows instead (copy practice on every token of the
    # window), half of them runs of value tokens (VALUE_POOL). A pair window has ~40 answer tokens, a quarter of
    # them multi-letter tokens ('sg', 'ep'): too few for the copy path to learn them all (the 0.73-0.79 model
    # copied 100% of single letters and 7% of multi-letter tokens, its attention on the source at p = 0.999).
    repeat_share: float = 0.0
    # Curriculum: copying heads form on repeated runs of random train tokens (every repeat a copy target), then
    # multi-query pairs in short windows, then pairs across up to ~900 tokens of filler in the probe's 1024.
    stages: tuple[Stage, ...] = (Stage(0.0, 128, 48, 0), Stage(0.05, 256, 200, 6), Stage(0.6, 1024, 900, 8))
    # Filler is drawn from the first train_bytes of each domain's train split (all of prose; ~0.6M code tokens,
    # more than a run reads): tokenizing all 10 MB of train code took minutes on the shared cores.
    train_bytes: int = 2_000_000
    eval_every: int = 250
    eval_windows: int = 4  # held-out code windows for the periodic bits/byte estimate
    eval_bytes: int = 300_000  # ... spread over the first eval_bytes of the held-out code
    eval_trials: int = 8  # train-split filler trials per distance for the periodic recall estimate
    eval_distances: tuple[int, ...] = (64, 512, 896)

    def to_dict(self) -> dict:
        return asdict(self)

    def stage(self, step: int, steps: int) -> Stage:
        return [s for s in self.stages if s.start * steps <= step][-1]


VALUE_POOL_WORDS = 20_000


def value_pool(encode, seed: int = 12345) -> np.ndarray:
    """The tokens of VALUE_POOL_WORDS random probe-style values, concatenated: the value tokens with their
    frequencies (single letters and the letter n-grams of ref-llama's BPE)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([encode(_word(rng, VALUE_LEN).encode()) for _ in range(VALUE_POOL_WORDS)]).astype(np.int64)


def head(data: bytes, n: int) -> bytes:
    """The first whole lines of `data` within n bytes (never a cut UTF-8 character)."""
    return data if len(data) <= n else data[: data.rfind(b"\n", 0, n) + 1]


def recall_window(
    filler: np.ndarray, rng: np.random.Generator, length: int, pairs: int, max_distance: int, encode
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, answer mask, source) of `length` tokens: train filler with `pairs` planted lines, each queried
    (query, value, quote) after a gap of up to `max_distance` filler tokens (the token distance adds the pieces
    in between). source[i] is the position in the planted line of the token that answer token i copies (-1
    elsewhere): the probe's pieces are encoded on their own and the planted line starts with exactly the query's
    and the answer's tokens (checked; a pair where they differ gets no source)."""
    drawn = [make_pair(rng, encode) for _ in range(pairs)]
    n_filler = length - sum(len(p.plant) + len(p.query) + len(p.answer) for p in drawn)
    inserts = []  # (filler offset, order, piece, kind: 0 plant / 1 query / 2 answer, pair)
    for i, p in enumerate(drawn):
        gap = int(rng.integers(1, min(max_distance, n_filler) + 1))
        at = int(rng.integers(0, n_filler - gap + 1))
        inserts += [(at, 2 * i, p.plant, 0, i), (at + gap, 2 * i + 1, p.query, 1, i),
                    (at + gap, 2 * i + 1, p.answer, 2, i)]
    inserts.sort(key=lambda x: (x[0], x[1]))
    start = int(rng.integers(0, len(filler) - n_filler))
    ids = splice(filler[start : start + n_filler], [(at, piece) for at, _, piece, _, _ in inserts])
    # each inserted token tagged with its pair, kind and index in its piece, so its position can be found
    tag = splice(np.full(n_filler, -1), [(at, (3 * i + kind) * 1000 + np.arange(len(piece)))
                                         for at, _, piece, kind, i in inserts])
    source = np.full(length, -1, np.int64)
    for i, p in enumerate(drawn):
        head_len = len(p.query) + len(p.answer)
        if p.plant[:head_len].tolist() != np.concatenate([p.query, p.answer]).tolist():
            continue
        plant_at = int(np.flatnonzero(tag == 3 * i * 1000)[0])
        answer_at = int(np.flatnonzero(tag == (3 * i + 2) * 1000)[0])
        source[answer_at : answer_at + len(p.answer)] = plant_at + len(p.query) + np.arange(len(p.answer))
    return ids, (tag >= 0) & ((tag // 1000) % 3 == 2), source


def repeat_window(
    data: np.ndarray, rng: np.random.Generator, length: int, max_run: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, copy mask, source): a run of 8..max_run train tokens drawn one by one at random positions (no
    n-gram to lean on), repeated to `length`; the mask marks every token of the repeats, source[i] = i - run
    the token it repeats (-1 in the first run). The run length varies, so only a content-matching (induction)
    head solves it."""
    run = int(rng.integers(8, max_run + 1))
    ids = np.resize(data[rng.integers(0, len(data), size=run)], length)
    pos = np.arange(length)
    return ids.astype(np.int64), pos >= run, np.where(pos >= run, pos - run, -1)


def sample_batch(
    rng: np.random.Generator, streams: dict[str, np.ndarray], stage: Stage, s: RecallSettings, encode
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, context + 1) ids, then for each predicted token: its loss weight (answer_weight on answers, 1 on a
    lm_fraction sample of the others, 0 elsewhere: not scored), the answer mask, and the source position of the
    token it copies (-1: none; see attention_loss)."""
    rows, weights, answers, sources = [], [], [], []
    for _ in range(max(1, s.tokens_per_step // stage.context)):
        data = streams["prose" if rng.random() < s.prose_fraction else "code"]
        repeat = not stage.pairs
        if stage.pairs and s.repeat_share and rng.random() < s.repeat_share:  # no draw at share 0: old runs replay
            repeat, data = True, streams["values"] if rng.random() < 0.5 else data
        if not repeat:
            ids, mask, source = recall_window(data, rng, stage.context + 1, stage.pairs, stage.max_distance, encode)
        else:
            max_run = stage.max_distance if not stage.pairs else min(stage.max_distance, stage.context // 2)
            ids, mask, source = repeat_window(data, rng, stage.context + 1, max_run)
        # no LM loss on a random run: it would teach the model to expect noise
        lm = (rng.random(stage.context) < s.lm_fraction) & (not repeat)
        rows.append(ids)
        weights.append(np.where(mask[1:], s.answer_weight, lm.astype(np.float64)))
        answers.append(mask[1:])
        sources.append(source[1:])
    return (torch.from_numpy(np.stack(rows).astype(np.int64)), torch.from_numpy(np.stack(weights).astype(np.float32)),
            torch.from_numpy(np.stack(answers)), torch.from_numpy(np.stack(sources)))


def attention_loss(
    attentions: tuple[torch.Tensor, ...], sources: torch.Tensor, offsets: tuple[int, ...], copy_heads: tuple[int, ...],
) -> torch.Tensor:
    """Attention supervision, the part of the recall circuit that plain next-token loss found too slowly here
    (a from-scratch 2-layer model copied 9% of repeated random tokens after 600 steps): in layer 0, head h
    attends to the token `offsets[h]` back, so each position carries its few preceding tokens (the key); in
    layer 1, each of `copy_heads`, at a position whose next token is a copy, attends to the source of that copy
    (the token after the same preceding tokens): induction heads matching the whole key. Several copy heads
    widen the path that carries the copied token to the logits (with one head of 32 dims the attention was
    right after 500 steps but the value was not copied). Mean -log p of the target, per head. `attentions`: per layer [B, H, T, T] probabilities; `sources` [B, T]: copy source of the
    token at each prediction position + 1, -1 for none."""
    t = sources.shape[1]
    pos = torch.arange(t)
    terms = []
    for h, off in enumerate(offsets):
        terms.append(-torch.log(attentions[0][:, h, pos[off:], pos[off:] - off] + 1e-9).mean())
    b, p = torch.nonzero(sources >= 0, as_tuple=True)
    if len(b):
        for h in copy_heads:
            terms.append(-torch.log(attentions[1][b, h, p, sources[b, p]] + 1e-9).mean())
    return torch.stack(terms).sum()


def split_residual(model: PreTrainedModel, dims: int) -> None:
    """Keep a token's own identity apart from what layer 0 gathers: the embeddings live in the first `dims`
    residual channels and layer 0's attention and MLP write only to the others. Without it the four
    previous-token copies of layer 0 overlay the token's embedding in 128 channels, and with the copy heads
    attending right (p = 0.74 on the source) the copied value still did not reach the logits. Applied at
    init and after every optimiser step (a projection, so the run stays deterministic)."""
    if not dims:
        return
    layer0 = model.model.layers[0]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dims:] = 0
        layer0.self_attn.o_proj.weight[:dims] = 0
        layer0.mlp.down_proj.weight[:dims] = 0


def train_step(
    model: PreTrainedModel, batch: torch.Tensor, weights: torch.Tensor, answers: torch.Tensor,
    sources: torch.Tensor, s: RecallSettings,
) -> tuple[torch.Tensor, dict]:
    """Weighted next-token cross-entropy over the scored positions only (the head runs on those alone) plus
    attention_weight * attention_loss; returns the loss and, for the log, the LM tokens' CE sum, the answer
    tokens' argmax hits and the attention loss."""
    scored = (weights > 0) | answers
    supervise = s.attention_weight > 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16_autocast):
        out = model.model(input_ids=batch[:, :-1], output_attentions=supervise)
        logits = model.lm_head(out.last_hidden_state[scored])
    target, w, answer = batch[:, 1:][scored], weights[scored], answers[scored]
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    loss = (ce * w).sum() / w.sum()
    att = attention_loss(out.attentions, sources, s.attention_offsets, s.copy_heads) if supervise else torch.zeros(())
    stats = {"lm_ce_sum": ce[~answer].sum().item(), "lm_tokens": target[~answer],
             "answer_hits": int((logits[answer].argmax(-1) == target[answer]).sum()), "answers": int(answer.sum()),
             "attention_loss": float(att.detach())}
    return loss + s.attention_weight * att, stats


@torch.inference_mode()
def quick_bits_per_byte(model: PreTrainedModel, tokens: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Cheap held-out estimate during training: n full windows spread evenly over `tokens` (float32)."""
    starts = np.linspace(0, len(tokens) - CONTEXT - 1, n).astype(int)
    x = torch.from_numpy(np.stack([tokens[i : i + CONTEXT + 1] for i in starts]))
    return round(metrics.nll_bits(model, x) / metrics.target_bytes(x, lengths), 4)


@torch.inference_mode()
def quick_recall(model: PreTrainedModel, filler: np.ndarray, encode, distances, trials: int, seed: int) -> dict:
    """Teacher-forced value-token accuracy by distance on `trials` probe-format trials (train filler, float32)."""
    out = {}
    for d in distances:
        rng = np.random.default_rng([seed, d])
        batch = [_trial(filler, rng, d, CONTEXT, False, encode) for _ in range(trials)]
        logits = model(input_ids=torch.from_numpy(np.stack([t.ids for t in batch]))).logits
        hits = sum(int((logits[i, t.first - 1 : t.first - 1 + t.value_tokens].argmax(-1).numpy()
                        == t.ids[t.first : t.first + t.value_tokens]).sum()) for i, t in enumerate(batch))
        out[str(d)] = round(hits / sum(t.value_tokens for t in batch), 3)
    return out


def train_loop(
    model: PreTrainedModel, streams: dict[str, np.ndarray], encode, steps: int, seed: int, s: RecallSettings,
    lengths: np.ndarray, on_eval=None, label: str = "ref-llama-recall",
) -> tuple[int, float]:
    """The training loop: exactly `steps` steps from `seed`; `on_eval(step, train-batch stats)` at step 0 and every
    eval_every steps. Returns (tokens seen, seconds)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    split_residual(model, s.token_dims)
    opt = make_optimizer(model, s)
    model.train()
    t0, tokens_seen, recent = time.perf_counter(), 0, []
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns) as bar:
        log = bar.console.log
        task = bar.add_task("train", total=steps, info="")
        if on_eval:
            log(on_eval(0, None))
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, s)
            stage = s.stage(step, steps)
            batch, weights, answers, sources = sample_batch(rng, streams, stage, s, encode)
            loss, st = train_step(model, batch, weights, answers, sources, s)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            split_residual(model, s.token_dims)
            tokens_seen += batch[:, 1:].numel()
            lm_bytes = int(lengths[st["lm_tokens"].numpy()].sum())
            train_bpb = round(st["lm_ce_sum"] / math.log(2) / lm_bytes, 4) if lm_bytes else None  # None: copy-only
            recent = (recent + [(st["answer_hits"], st["answers"])])[-25:]
            answer_acc = round(sum(h for h, _ in recent) / max(1, sum(n for _, n in recent)), 3)
            tok_s = tokens_seen / (time.perf_counter() - t0)
            info = (f"{stage.pairs} pairs d<={stage.max_distance}  LM {train_bpb or float('nan'):.3f} bits/byte  "
                    f"attention {st['attention_loss']:.2f}  "
                    f"answers {answer_acc:.2f} (last 25 steps)  {tok_s:,.0f} tok/s")
            if on_eval and ((step + 1) % s.eval_every == 0 or step + 1 == steps):
                log(on_eval(step + 1, {"lm_bits_per_byte": train_bpb, "answer_accuracy_last_25": answer_acc}))
            bar.update(task, advance=1, info=info)
            if not bar.console.is_terminal and (step + 1) % 25 == 0:
                log(f"step {step + 1}/{steps} {info}")  # a live log when writing to a file
    return tokens_seen, time.perf_counter() - t0


def new_model(seed: int) -> PreTrainedModel:
    """The recall model's architecture with fresh float32 weights drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # eager attention returns the probabilities that attention_loss supervises
        return AutoModelForCausalLM.from_config(models.ref_llama_recall_config(), dtype=torch.float32,
                                                attn_implementation="eager")


def train(steps: int, seed: int, out: Path, command: str, base: Path = BASE, snapshots: Path | None = None,
          init: Path | None = None, lr: float | None = None, repeat_share: float | None = None,
          pairs: int | None = None) -> dict:
    """Train a new model for exactly `steps` steps on `base`'s tokenizer; save the bf16 checkpoint, the
    tokenizer files and train_config.json."""
    torch.set_num_threads(1)
    s = RecallSettings()
    if repeat_share is not None:
        s = dataclasses.replace(s, repeat_share=repeat_share)
    if init is not None:  # a continuation: the last stage only, from a checkpoint of a first run
        last = dataclasses.replace(s.stages[-1], start=0.0, pairs=pairs or s.stages[-1].pairs)
        s = dataclasses.replace(s, stages=(last,), lr=lr or s.lr)
        model = metrics.load(init, attn_implementation="eager")
    else:
        model = new_model(seed)
    tok = tokenizer.load_tokenizer(base)
    encode = lambda b: tokenizer.encode(b, tok)  # noqa: E731
    lengths = tokenizer.byte_lengths(tok)
    streams = {d: encode(head(corpus.train_bytes(d), s.train_bytes)) for d in corpus.DOMAINS}
    streams["values"] = value_pool(encode)
    held_code = encode(head(corpus.held_out_bytes("code"), s.eval_bytes))
    history: list[dict] = []

    def on_eval(step: int, train_batch: dict | None) -> str:
        model.eval()
        history.append({
            "step": step, "train_batch": train_batch,
            "code": quick_bits_per_byte(model, held_code, lengths, s.eval_windows),
            "recall_train_filler": quick_recall(model, streams["code"], encode, s.eval_distances, s.eval_trials, seed),
        })
        model.train()
        if snapshots is not None and step:  # a bf16 copy at each evaluation, e.g. for a run cut short
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(snapshots / f"step-{step}", safe_serialization=True)
        return json.dumps(history[-1])

    tokens_seen, elapsed = train_loop(model, streams, encode, steps, seed, s, lengths, on_eval)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(base / f, out / f)
    train_config = {
        "model": "ref-llama-recall", "init": str(init) if init else "from scratch (seed)", "tokenizer_from": "models/ref-llama",
        "command": command, "seed": seed, "steps": steps,
        "minutes_elapsed": round(elapsed / 60, 2), "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_seen / elapsed), "params": sum(p.numel() for p in model.parameters()),
        "config": model.config.to_diff_dict(), "settings": s.to_dict(), "threads": 1,
        "precision": ("fp32 weights, bf16 autocast" if s.bf16_autocast else "fp32") + "; saved as bf16",
        "tokenizer": tokenizer.describe(tok) + " (ref-llama's, trained on the train split)",
        "filler": "train split only (code, prose_fraction prose); the probe's filler is held-out code",
        "train_tokens": {d: len(t) for d, t in streams.items()},
        "corpus": {"split_hash": corpus.split_hash(), "held_out_mod": corpus.HELD_OUT_MOD, **corpus.summary()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "history": history,
    }
    (out / "train_config.json").write_text(json.dumps(train_config, indent=1) + "\n")
    return train_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--snapshots", type=Path, help="also save a bf16 copy under DIR/step-N at each evaluation")
    p.add_argument("--no-metrics", action="store_true", help="skip the full held-out measurement")
    p.add_argument("--init", type=Path, help="continue from this checkpoint, on the last stage only")
    p.add_argument("--lr", type=float, help="peak learning rate of a continuation (default: the settings')")
    p.add_argument("--pairs", type=int, help="planted pairs per window of a continuation (default: the last stage's)")
    p.add_argument("--repeat-share", type=float, help="share of repeat windows in pair stages (default: 0)")
    a = p.parse_args(argv)
    command = "python -m memc.reference.recall " + " ".join(argv if argv is not None else sys.argv[1:])
    train(a.steps, a.seed, a.out, command, snapshots=a.snapshots, init=a.init, lr=a.lr, repeat_share=a.repeat_share, pairs=a.pairs)
    if not a.no_metrics:
        from memc.reference import recall_metrics

        recall_metrics.main([str(a.out)])


if __name__ == "__main__":
    main()
