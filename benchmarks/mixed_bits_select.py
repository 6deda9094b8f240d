"""Choose the distillation setting of toolchains/mixed-bits.toml on train-split validation text, never on held-out.

    python -m benchmarks.mixed_bits_select [--windows 96] [--candidates NAME,...] [--name N] [--merge N,...]

Selection rule, fixed before any of these numbers were measured: memc's ILP plan at the uniform int4-g128 size,
quantized by the ``quantize`` pass (GPTQ act-order on the 8 calibration batches) with each candidate below; the
candidate with the lowest per-byte perplexity on the validation windows is the toolchain's default. Candidates
(scope "scales", 512-token distillation windows, 2 per step, seed 0)::

    150 steps, lr 5e-3, 32 windows   (the toolchain's setting before this selection)
    300 steps, lr 5e-3, 32 windows
    300 steps, lr 5e-3, 64 windows
    150 steps, lr 1e-2, 32 windows

Validation windows: ``--windows`` windows of 1024 tokens of ``trainsplit:code``, evenly spaced among the aligned
1024-token windows that share no token position with anything calibration or distillation reads — the 8
calibration samples (quant-sensitivity scores, GPTQ Hessians) and every candidate's distillation windows. Those
read windows are produced by the passes' own functions (memc.calibration.calibration_samples,
memc.passes.quant.quantize.distill_inputs) and located in the tokenized train text by content, every occurrence,
so the exclusion does not rely on restating their offset formulas; a read window not found is an error.
Δ = per-byte perplexity vs fp32 on the same windows ± paired SE over windows; "vs first" = the same against the
first candidate. ``--candidates`` runs a subset (two processes on two cores), ``--merge`` adds other runs' rows,
and the selection is made once all candidates are in one table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

from benchmarks.harness import RESULTS, Table
from benchmarks.mixed_bits import CONTEXT, _bits_per_window, _delta, _distilled, _merged, _program


@dataclasses.dataclass(frozen=True)
class Candidate:
    steps: int
    lr: float
    windows: int

    @property
    def name(self) -> str:
        return f"{self.steps} steps lr {self.lr:g} {self.windows} windows"


CANDIDATES = (Candidate(150, 5e-3, 32), Candidate(300, 5e-3, 32), Candidate(300, 5e-3, 64), Candidate(150, 1e-2, 32))
DISTILL_CONTEXT = 512


def _occurrences(tokens: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Every start position at which ``seq`` occurs in ``tokens``."""
    head = min(8, len(seq))
    view = np.lib.stride_tricks.sliding_window_view(tokens, head)[: len(tokens) - len(seq) + 1]
    starts = np.flatnonzero((view == seq[:head]).all(1))
    return np.array([s for s in starts if np.array_equal(tokens[s : s + len(seq)], seq)], dtype=np.int64)


def read_windows(program, cfg, distill_windows: list[int], seed: int = 0) -> list[np.ndarray]:
    """The token rows calibration and distillation read: each calibration sample (its rows are one contiguous
    stretch) and each distillation window, for every ``distill_windows`` count."""
    from memc.calibration import calibration_samples
    from memc.passes.base import PassContext
    from memc.passes.quant.quantize import QuantizeOptions, distill_inputs

    rows = [s[0].reshape(-1).numpy() for s in calibration_samples(program, cfg.calibration, cfg.inputs, seed)]
    ctx = PassContext(seed=seed, calibration=[], config=cfg)
    for n in sorted(set(distill_windows)):
        opts = QuantizeOptions(distill_steps=1, distill_windows=n, distill_context=DISTILL_CONTEXT)
        rows += [r.numpy() for batch in distill_inputs(program, opts, ctx, "validation") for r in batch[0]]
    return rows


def validation_windows(tokens: np.ndarray, read: list[np.ndarray], count: int, context: int = CONTEXT) -> np.ndarray:
    """Start offsets of ``count`` aligned ``context``-token windows of ``tokens``, evenly spaced among those that
    overlap no occurrence of any ``read`` row."""
    used = np.zeros(len(tokens), dtype=bool)
    for row in read:
        found = _occurrences(tokens, row)
        if not len(found):
            raise RuntimeError(f"a calibration / distillation window of {len(row)} tokens is not in the validation "
                               "tokenization of the text; cannot prove the validation windows disjoint")
        for s in found:
            used[s : s + len(row)] = True
    starts = np.arange(0, len(tokens) - context + 1, context)
    free = starts[[not used[s : s + context].any() for s in starts]]
    if len(free) < count:
        raise RuntimeError(f"only {len(free)} validation windows of {context} tokens are free; asked for {count}")
    return free[np.linspace(0, len(free) - 1, count).round().astype(np.int64)]


def _paired(bits: np.ndarray, ref: np.ndarray, nbytes: np.ndarray) -> str:
    d, se = _delta(bits, ref, nbytes)
    return f"{d:+.3f}% ± {se:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--windows", type=int, default=96, help="validation windows of 1024 train-code tokens")
    ap.add_argument("--candidates", default="", help="comma-separated candidate names to run (default: all; "
                    "'none': only --merge the named runs and select)")
    ap.add_argument("--cache-dir", default="~/.cache/memc/sensitivity")
    ap.add_argument("--name", default="mixed_bits_select", help="results/NAME.{md,json}")
    ap.add_argument("--merge", default="", help="comma-separated results/NAME.json of other --candidates runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.candidates == "none":
        return _merge_only(args.name, args.merge)
    chosen = [c for c in CANDIDATES if not args.candidates or c.name in args.candidates.split(",")]
    if args.candidates and len(chosen) != len(args.candidates.split(",")):
        raise SystemExit(f"--candidates: choose from {[c.name for c in CANDIDATES]}")

    from memc.calibration import calibration_samples
    from memc.eval.backends import TorchBackend
    from memc.eval.text import text_codec, tokenize
    from memc.passes.base import PassContext
    from memc.passes.quant.allocate import AllocateBits, AllocateOptions
    from memc.passes.quant.quantize import PLAN
    from memc.passes.quant.sensitivity import DEFAULT_CANDIDATES, SENSITIVITY, QuantSensitivity, SensitivityOptions
    from memc.quant.formats import parse_format
    from memc.quant.sites import find_weights
    from memc.reference import corpus

    program, cfg = _program(args.model)
    calib = calibration_samples(program, cfg.calibration, cfg.inputs, cfg.seed)
    info = TorchBackend(program).info
    tokens, spans = tokenize(corpus.train_bytes("code"), info, text_codec(info))
    starts = validation_windows(tokens, read_windows(program, cfg, [c.windows for c in CANDIDATES]), args.windows)
    windows = np.stack([tokens[s : s + CONTEXT] for s in starts])
    nbytes = np.stack([spans[s : s + CONTEXT] for s in starts])[:, 1:].sum(1).astype(np.float64)
    print(f"{len(windows)} validation windows, first {starts[0]}, last {starts[-1]} of {len(tokens)} tokens", flush=True)

    ctx = PassContext(seed=0, calibration=calib, config=cfg)
    QuantSensitivity(SensitivityOptions(candidates=DEFAULT_CANDIDATES, cache_dir=args.cache_dir)).run(program, ctx)
    weights, _ = find_weights(program)
    budget = sum(parse_format("int4-g128").nbytes(w.shape) for w in weights) + program.annotations[SENSITIVITY]["graph_bytes"]
    AllocateBits(AllocateOptions(budget=str(budget))).run(program, ctx)
    plan = dict(program.annotations.pop(PLAN))

    base = _bits_per_window(program, windows)
    raw = {"fp32_bits_per_byte": base.sum() / nbytes.sum(), "windows": len(windows), "starts": starts.tolist(),
           "fp32_bits": base.tolist(), "nbytes": nbytes.tolist(), "budget": budget}
    rows: list[list] = []
    command = f"python -m benchmarks.mixed_bits_select --windows {args.windows}" + (
        f" --candidates '{args.candidates}'" if args.candidates else "")
    notes = [f"ref-llama, ILP plan at the int4-g128 size ({budget:,} B), GPTQ act-order + distillation (scope scales); "
             f"validation: {len(windows)} windows of {CONTEXT} train-code tokens disjoint from every calibration and "
             f"distillation window (token offsets {starts[0]}..{starts[-1]} of {len(tokens)}), fp32 "
             f"{raw['fp32_bits_per_byte']:.4f} bits/byte; Δ vs fp32 ± paired SE over windows."]
    raw["note"] = notes[0]
    table = Table(args.name, command, ["candidate", "bits/byte", "Δ ppl/byte", "KL before → after", "seconds"], rows,
                  notes, raw)
    gctx = PassContext(seed=0, calibration=calib, config=cfg)
    for c in chosen:
        t, cpu = time.perf_counter(), time.process_time()
        opts = {"act_order": True, "distill_steps": c.steps, "distill_scope": "scales", "distill_lr": c.lr,
                "distill_weight_lr": 1e-2, "distill_windows": c.windows, "distill_context": DISTILL_CONTEXT,
                "distill_batch": 2}
        p, _, _, m = _distilled(program, plan, opts, gctx)
        bits = _bits_per_window(p, windows)
        d, se = _delta(bits, base, nbytes)
        raw[c.name] = {"bits": bits.tolist(), "delta_pct": d, "se_pct": se, "distill": m,
                       "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
                       "load": os.getloadavg()}
        rows.append([c.name, f"{bits.sum() / nbytes.sum():.4f}", f"{d:+.3f}% ± {se:.3f}",
                     f"{m['kl_before']:.4f} → {m['kl_after']:.4f}", f"{raw[c.name]['seconds']:.0f}"])
        print(rows[-1], flush=True)
        table.write()
    merged = _select(_merge_all(table, args.merge))
    merged.write()
    print(merged.markdown(), flush=True)


def _merge_all(table: Table, names: str) -> Table:
    for name in filter(None, names.split(",")):
        other = _merged(table, name)
        if other.raw["starts"] != table.raw["starts"]:
            raise SystemExit(f"--merge {name}: measured on other validation windows")
        table = other
    return table


def _merge_only(name: str, names: str) -> None:
    """``--candidates none``: the first of ``names`` plus the others' rows, with the selection, as results/NAME."""
    import json

    first, *rest = [n for n in names.split(",") if n] or [""]
    if not first:
        raise SystemExit("--candidates none: name the runs to merge with --merge")
    data = json.loads((RESULTS / f"{first}.json").read_text())
    table = Table(name, data["command"], data["columns"], data["rows"], [data["raw"]["note"]], data["raw"])
    table = _select(_merge_all(table, ",".join(rest)))
    print(f"wrote {table.write()}")
    print(table.markdown(), flush=True)


def _select(table: Table) -> Table:
    """The table with the selection (lowest validation bits/byte) once every candidate is in it."""
    raw = table.raw
    if not all(c.name in raw for c in CANDIDATES):
        return table
    nbytes = np.array(raw["nbytes"])
    bits = {c.name: np.array(raw[c.name]["bits"]) for c in CANDIDATES}
    first = CANDIDATES[0].name
    best = min(bits, key=lambda n: bits[n].sum())
    vs = [f"{n} vs {first}: {_paired(bits[n], bits[first], nbytes)}" for n in bits if n != first]
    return dataclasses.replace(table, raw={**raw, "selected": best},
                               notes=table.notes + [f"selected (lowest validation bits/byte): **{best}**; " + "; ".join(vs)])


if __name__ == "__main__":
    main()
