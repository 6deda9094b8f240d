"""Task-adaptive expert patterns on ref-moe-domains (Qwen3-MoE, 16 experts top-2 x 4 layers, 4 domains): held-out
bits/byte per domain of the full model vs the matched pattern at 50% of the experts vs one global pruning at the
same expert count.

    python -m benchmarks.moe_patterns [--max-windows 512] [--calib-windows 32]

The pattern library is memc's moe-patterns pass: per domain, moe-calibrate's statistics on ``--calib-windows``
windows of that domain's TRAIN split, 8 of 16 experts kept per layer by TCESS. The global pruning ranks by the same
criterion on the same windows of all four domains together (calibrated on the mix). Each domain's pattern is
chosen by the pass from a sample of the workload (``--target-windows`` held-out windows; the choice from a train-
split sample is reported next to it). Scoring: transformers' Qwen3-MoE (eager experts, float32) with the pruned
weights, on non-overlapping windows of its training context (256 tokens) of the domain's held-out split: all of them, or every N-th where
a domain has more than ``--max-windows`` (an unselected sample). Every variant scores the same windows, so
differences are paired (memc.eval.paired: Δ bits/byte and its standard error).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Table, cpu_info

MODEL = Path(__file__).resolve().parents[1] / "models" / "ref-moe-domains"
DOMAINS = ("prose", "code", "vimhelp", "c")


def _program():
    from memc.capture import capture
    from memc.config import ToolchainConfig
    from memc.passes.base import PassContext
    from memc.passes.moe.detect import DetectMoE

    return DetectMoE().run(capture(str(MODEL), ToolchainConfig()), PassContext()).program


def _hf_model(state: dict | None, experts: int):
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(MODEL, local_files_only=True)
    if state is None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            MODEL, dtype=torch.float32, experts_implementation="eager", local_files_only=True).eval()
    cfg.num_experts = experts
    cfg.num_local_experts = experts
    model = transformers.Qwen3MoeForCausalLM._from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    state = dict(state)
    for a, b in (("model.embed_tokens.weight", "lm_head.weight"), ("lm_head.weight", "model.embed_tokens.weight")):
        if a not in state and b in state:  # tied: the graph keeps one of the two names
            state[a] = state[b]
    expected = model.state_dict()
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    assert not missing, missing
    return model.eval()


def _pruned(program, sites, kept: list[list[int]], experts: int):
    from memc.passes.moe.rewrite import keep_experts

    module = copy.deepcopy(program.module)
    for site, ids in zip(sites, kept):
        keep_experts(module, site, ids)
    return _hf_model(module.state_dict(), experts)


def _windows(domain: str, context: int, max_windows: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(ids [n, context], bytes per id, every, windows in the whole held-out split)."""
    from memc.reference import corpus, tokenizer

    tok = tokenizer.load_tokenizer(MODEL)
    ids = tokenizer.encode(corpus.held_out_bytes(domain), tok)
    total = len(ids) // context
    every = max(1, math.ceil(total / max_windows))
    rows = ids[: total * context].reshape(total, context)[::every]
    return rows, tokenizer.byte_lengths(tok)[rows], every, total


def _nll(model, rows: np.ndarray, batch: int = 8) -> np.ndarray:
    """NLL (nats) of tokens 1..context-1 of every window, float64 [n, context - 1]."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            x = torch.from_numpy(rows[i : i + batch])
            logits = model(input_ids=x, use_cache=False).logits.double()
            out.append(torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-windows", type=int, default=512, help="per domain; above it every N-th window is scored")
    ap.add_argument("--calib-windows", type=int, default=32, help="train-split windows per domain for the patterns")
    ap.add_argument("--target-windows", type=int, default=4, help="workload-sample windows routed to pick a pattern")
    ap.add_argument("--match", default="first-layer", choices=("first-layer", "all-layers"))
    ap.add_argument("--model", type=Path, help="a Qwen3-MoE directory trained on the four domains (default: ref-moe-domains)")
    args = ap.parse_args(argv)
    global MODEL
    MODEL = args.model or MODEL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from memc.eval.paired import paired_delta
    from memc.passes.moe.patterns import MoEPatterns, PatternsOptions, kept_sets, merge_stats

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from memc.reference.metrics import checkpoint_training

    context = checkpoint_training(MODEL)[1]  # the training context (256 for ref-moe-domains)
    t0 = time.perf_counter()
    program = _program()
    sites = program.annotations["sites.moe"]
    opts = PatternsOptions(corpora=[f"trainsplit:{d}" for d in DOMAINS], keep_fraction=0.5, criterion="tcess",
                           match=args.match, windows=args.calib_windows, target_windows=args.target_windows,
                           context=context)
    patterns = MoEPatterns(opts)
    stats = patterns.corpus_stats(program, sites)
    library = patterns.library(sites, stats)
    keep = library.keep
    global_kept = kept_sets(sites, merge_stats(stats), "tcess", keep, "uniform")
    calib_seconds = time.perf_counter() - t0
    print(f"library built in {calib_seconds:.0f}s; keep {keep} per layer", flush=True)

    full = _hf_model(None, sites[0].num_experts)
    global_model = _pruned(program, sites, global_kept, keep[0])
    table = Table(
        "moe_patterns", " ".join(["python -m benchmarks.moe_patterns", *(sys.argv[1:] if argv is None else argv)]),
        ["domain", "windows", "full bits/byte", "pattern (from held-out / train sample)", "matched bits/byte",
         "Δ matched − full (± SE)", "global bits/byte", "Δ global − full (± SE)", "Δ matched − global (± SE)",
         "matched beats global"])
    raw: dict = {"keep": keep, "global_kept": global_kept, "library": library.to_dict(), "domains": {}}
    models: dict[str, object] = {}
    for domain in DOMAINS:
        choice = {}
        for source in ("heldout", "trainsplit"):
            p = MoEPatterns(PatternsOptions(**{**opts.__dict__, "target": f"{source}:{domain}"}))
            name, sims, tokens = p.choose(program, sites, library)
            choice[source] = {"chosen": name, "similarities": {k: round(v, 4) for k, v in sims.items()}, "tokens": tokens}
        chosen = choice["heldout"]["chosen"]
        if chosen not in models:
            models[chosen] = _pruned(program, sites, library.pattern(chosen).kept, keep[0])
        rows, spans, every, total = _windows(domain, context, args.max_windows)
        t = time.perf_counter()
        nll_full, nll_matched, nll_global = (_nll(m, rows) for m in (full, models[chosen], global_model))
        spans = spans[:, 1:].astype(np.float64)
        vs_full = paired_delta(nll_full, nll_matched, spans)
        g_full = paired_delta(nll_full, nll_global, spans)
        vs_global = paired_delta(nll_global, nll_matched, spans)
        sample = f"{len(rows)} of {total}" + ("" if every == 1 else f" (1/{every})")
        table.rows.append([
            domain, sample, f"{vs_full.bits_per_byte_a:.4f}",
            f"{chosen} / {choice['trainsplit']['chosen']}", f"{vs_full.bits_per_byte_b:.4f}",
            f"{vs_full.delta:+.4f} ± {vs_full.se:.4f}", f"{g_full.bits_per_byte_b:.4f}",
            f"{g_full.delta:+.4f} ± {g_full.se:.4f}", f"{vs_global.delta:+.4f} ± {vs_global.se:.4f}",
            "yes" if vs_global.delta < 0 else "no",
        ])
        raw["domains"][domain] = {"windows": len(rows), "windows_total": total, "every": every, "choice": choice,
                                  "matched_vs_full": vs_full.as_dict(), "global_vs_full": g_full.as_dict(),
                                  "matched_vs_global": vs_global.as_dict(), "eval_seconds": time.perf_counter() - t}
        print(table.rows[-1], flush=True)
    overlap = {p.name: [len(set(a) & set(b)) for a, b in zip(p.kept, global_kept)] for p in library.patterns}
    table.notes += [
        f"ref-moe-domains ({sum(p.numel() for p in full.parameters()):,} params), {keep[0]} of "
        f"{sites[0].num_experts} experts kept in each of its {len(sites)} MoE layers (50%), top-2 routing "
        "renormalised over the kept experts. Bits/byte over the exact UTF-8 bytes of the scored tokens.",
        f"Patterns: moe-patterns, TCESS on {args.calib_windows} train-split windows of {context} tokens per domain; "
        f"chosen by cosine of the TCESS vectors ({args.match}) of {args.target_windows} windows of the held-out "
        "split (before the slash; the same choice from a train-split sample after it). Global: TCESS on the same "
        f"{args.calib_windows * len(DOMAINS)} windows of all domains together. Library + calibration: "
        f"{calib_seconds:.0f} s.",
        "Experts shared with the global pruning per layer: "
        + "; ".join(f"{k}: {v}" for k, v in overlap.items()) + f" (of {keep[0]}).",
        "Δ: paired over the same windows, b − a in bits/byte with the ratio-estimator standard error "
        "(memc.eval.paired). '1/N': every N-th window, an unselected sample of the held-out split.",
        f"CPU: {cpu_info()}, {os.cpu_count()} cores shared with other jobs, 1 thread.",
    ]
    raw["overlap_with_global"] = overlap
    table.raw = raw
    table.publish()


if __name__ == "__main__":
    main()
