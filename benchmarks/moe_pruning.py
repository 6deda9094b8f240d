"""Expert pruning of ref-moe (Qwen3-MoE, 16 experts top-2 in 4 layers): held-out per-byte perplexity by criterion,
pruned fraction, calibration domain, merge and router re-fit.

    python -m benchmarks.moe_pruning run --configs baseline,grid50,grid75,grid25,cross,variants
    python -m benchmarks.moe_pruning run --configs headline      # whole held-out code + prose
    python -m benchmarks.moe_pruning table

Each configuration runs memc's own passes on the captured program (detect-moe, moe-calibrate on the TRAIN split,
prune-experts) and is scored on the held-out split with the pruned weights loaded into transformers' Qwen3-MoE
(eager experts: the same arithmetic as the batched_mm graph memc exports, ~15x faster on CPU, so the whole held-out
sets fit; the pruned program == masked reference == this model is what tests/passes/moe checks). Windows are the
non-overlapping 1024-byte windows `memc eval` uses; each configuration's per-window NLL is paired with the unpruned
model's on the same windows (Δ per-byte perplexity and its paired standard error). One raw JSON per configuration
goes to results/moe_pruning.raw/, so runs can be split over processes and resumed; `table` renders them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, Table

MODEL = Path(__file__).resolve().parents[1] / "models" / "ref-moe"
RAW = RESULTS / "moe_pruning.raw"
CONTEXT = 1024
CALIB_WINDOWS = 32
CRITERIA = ("frequency", "soft-frequency", "tcess", "ean", "reap", "random")
FRACTIONS = (0.25, 0.5, 0.75)  # of experts pruned


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags"))
        isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
        return f"{name} ({isa})"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def config_id(c: dict) -> str:
    refit = ""
    if c.get("refit"):
        refit = f"-refit{c['refit']}"
        if c.get("scope", "router") != "router":
            refit += f"x-w{c['refit_windows']}-lr{c['refit_lr']:g}"
    return "{calib}-{criterion}-p{pruned}{merge}{refit}-{code}".format(
        calib=c["calib"], criterion=c["criterion"], pruned=int(round(c["pruned"] * 100)),
        merge="-merge" if c.get("merge") else "", refit=refit,
        code="whole" if c["code_every"] == 1 else f"every{c['code_every']}",
    ) + ("" if c.get("prose_every", 1) == 1 else f"-prose{c['prose_every']}")


# --- the model and the passes -------------------------------------------------------------------------------------
def _captured():
    from memc.capture import capture
    from memc.config import ToolchainConfig
    from memc.passes.base import PassContext
    from memc.passes.moe.detect import DetectMoE

    program = capture(str(MODEL), ToolchainConfig())
    return DetectMoE().run(program, PassContext()).program


def _calibration(program, domain: str):
    """moe-calibrate on the train split of ``domain``; cached on disk across processes (same seed, same result)."""
    import torch

    from memc.passes.base import PassContext
    from memc.passes.moe.calibrate import CALIBRATION_KEY, CalibrateOptions, MoECalibrate

    cache = Path(os.environ.get("TMPDIR", "/tmp")) / f"memc-moe-calib-{domain}-{CALIB_WINDOWS}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    opts = CalibrateOptions(text=f"trainsplit:{domain}", windows=CALIB_WINDOWS, context=CONTEXT)
    calib = MoECalibrate(opts).run(program, PassContext()).program.annotations[CALIBRATION_KEY]
    torch.save(calib, cache)
    return calib


def _hf_model(state: dict | None, experts: int):
    import torch
    import transformers

    if state is None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            MODEL, dtype=torch.float32, experts_implementation="eager", local_files_only=True).eval()
    cfg = transformers.AutoConfig.from_pretrained(MODEL, local_files_only=True)
    cfg.num_experts = experts
    cfg.num_local_experts = experts
    model = transformers.Qwen3MoeForCausalLM._from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    assert not missing, missing
    return model.eval()


def _window_nll(model, data: bytes, every: int) -> list[float]:
    """Summed NLL (nats) of each non-overlapping window's positions 1..CONTEXT-1, for windows 0, every, 2*every..."""
    import torch

    n = len(data) // CONTEXT
    ids = torch.from_numpy(np.frombuffer(data[: n * CONTEXT], np.uint8).astype(np.int64)).view(n, CONTEXT)[::every]
    out = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], 4):
            batch = ids[start : start + 4]
            logits = model(input_ids=batch, use_cache=False).logits.double()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
            out.extend(float(v) for v in nll.sum(1))
    return out


def run_config(c: dict, program, calibs: dict) -> dict:
    import torch

    from memc.passes.base import PassContext
    from memc.passes.moe.calibrate import CALIBRATION_KEY
    from memc.passes.moe.prune import PruneExperts, PruneOptions
    from memc.reference import corpus

    torch.manual_seed(0)
    result = {**c, "id": config_id(c)}
    t0 = time.perf_counter()
    if c["criterion"] == "unpruned":
        model, params = _hf_model(None, 16), program.parameter_stats()[1]
    else:
        keep = 16 - int(round(16 * c["pruned"]))
        p = program.replace(module=copy.deepcopy(program.module), annotations=dict(program.annotations))
        p.annotations[CALIBRATION_KEY] = calibs[c["calib"]]
        opts = PruneOptions(keep=keep, criterion=c["criterion"], merge=bool(c.get("merge")),
                            refit_steps=int(c.get("refit") or 0), refit_lr=c.get("refit_lr", 5e-3),
                            refit_scope=c.get("scope", "router"), refit_windows=c.get("refit_windows", 0),
                            refit_context=CONTEXT)
        res = PruneExperts(opts).run(p, PassContext(seed=0))
        result["kept"] = res.metrics["kept"]
        result["refit_kl"] = res.metrics.get("refit")
        model, params = _hf_model(p.module.state_dict(), keep), p.parameter_stats()[1]
    result["prune_seconds"] = time.perf_counter() - t0
    result["parameter_bytes"] = params
    t1 = time.perf_counter()
    result["code_nll"] = _window_nll(model, corpus.held_out_bytes("code"), c["code_every"])
    result["prose_nll"] = _window_nll(model, corpus.held_out_bytes("prose"), c.get("prose_every", 1))
    result["eval_seconds"] = time.perf_counter() - t1
    return result


GROUPS = ("baseline", "grid50", "grid75", "grid25", "cross", "variants", "refit", "heal", "heal-merge", "headline",
          "headline-heal", "calibrate-prose")


def configs(which: str, every: int, prose_every: int, best: str, heal: dict | None = None) -> list[dict]:
    """Configurations of one group. headline: whole held-out sets; the others score every ``every``-th code window
    and every ``prose_every``-th prose window (unselected samples, paired with the unpruned model's)."""
    base = {"calib": "code", "code_every": every, "prose_every": prose_every}
    order = (best,) + tuple(c for c in ("frequency", "ean", "random", "soft-frequency", "tcess", "reap") if c != best)
    if which == "baseline":
        return [{**base, "criterion": "unpruned", "pruned": 0.0, "calib": "-"}]
    if which == "headline":
        return [{**base, "criterion": best, "pruned": f, "code_every": 1, "prose_every": 1} for f in (0.5, 0.75)]
    if which in ("heal", "heal-merge", "headline-heal"):
        whole = {"code_every": 1, "prose_every": 1} if which == "headline-heal" else {}
        return [{**base, **whole, "criterion": best, "pruned": f, "merge": which == "heal-merge", **(heal or {})}
                for f in (0.5, 0.75)]
    if which in ("grid50", "grid75"):
        return [{**base, "criterion": c, "pruned": int(which[4:]) / 100} for c in order]
    if which == "grid25":
        return [{**base, "criterion": c, "pruned": 0.25} for c in (best, "frequency", "random")]
    if which == "cross":
        return [{**base, "calib": "prose", "criterion": c, "pruned": 0.5} for c in (best, "frequency")]
    if which == "refit":
        return [{**base, "criterion": best, "pruned": f, "refit": 8} for f in (0.5, 0.75)]
    if which == "variants":
        return [{**base, "criterion": best, "pruned": f, "merge": True} for f in (0.5, 0.75)] + [
            {**base, "criterion": best, "pruned": 0.5, "refit": 8}]
    return []


def cmd_run(args) -> None:
    import torch

    torch.set_num_threads(1)
    RAW.mkdir(parents=True, exist_ok=True)
    heal = {"refit": args.refit_steps, "scope": "router+experts", "refit_windows": args.refit_windows,
            "refit_lr": args.refit_lr}
    todo = [c for group in args.configs.split(",")
            for c in configs(group, args.code_every, args.prose_every, args.best, heal)]
    todo = [c for c in todo if not (RAW / f"{config_id(c)}.json").is_file()]
    if args.configs == "calibrate-prose":
        todo = [{"calib": "prose"}]
    if not todo:
        print("nothing to do")
        return
    program = _captured()
    calibs: dict = {}
    for c in todo:
        if c["calib"] not in ("-",) and c["calib"] not in calibs:
            t = time.perf_counter()
            calibs[c["calib"]] = _calibration(program, c["calib"])
            print(f"calibration {c['calib']}: {time.perf_counter() - t:.0f}s (pass: {calibs[c['calib']].seconds:.0f}s)", flush=True)
    for c in todo:
        if args.configs == "calibrate-prose":
            break
        r = run_config(c, program, calibs)
        r["calibration_seconds"] = calibs[c["calib"]].seconds if c["calib"] in calibs else 0.0
        (RAW / f"{r['id']}.json").write_text(json.dumps(r) + "\n")
        print(f"{r['id']}: eval {r['eval_seconds']:.0f}s", flush=True)


# --- the table ----------------------------------------------------------------------------------------------------
def _delta(pruned: list[float], base: list[float]) -> tuple[float, float]:
    """Δ per-byte perplexity (%) and its paired standard error, from per-window NLL sums of equal window length."""
    d = (np.asarray(pruned) - np.asarray(base)) / (CONTEXT - 1)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return 100 * (math.exp(mean) - 1), 100 * math.exp(mean) * se


def _windows(r: dict) -> str:
    def one(n: int, every: int) -> str:
        return f"{n}" if every == 1 else f"{n} (1/{every})"

    return f"{one(len(r['code_nll']), r['code_every'])} / {one(len(r['prose_nll']), r.get('prose_every', 1))}"


def _refit_cell(r: dict) -> str:
    if not r.get("refit"):
        return ""
    if r.get("scope", "router") == "router":
        return f"router, {r['refit']} steps"
    return f"router+experts, {r['refit']} steps, {r['refit_windows']} windows, lr {r['refit_lr']:g}"


def _bpb(nll: list[float]) -> float:
    return float(np.sum(nll)) / (len(nll) * (CONTEXT - 1)) / math.log(2)


def cmd_table(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RAW.glob("*.json"))]
    bases = {(r["code_every"], r.get("prose_every", 1)): r for r in rows if r["criterion"] == "unpruned"}
    base = bases[min(bases)]
    every = {r["code_every"] for r in rows}
    t = Table("moe_pruning", "python -m benchmarks.moe_pruning run --configs ... && python -m benchmarks.moe_pruning table",
              ["pruned", "criterion", "calibration", "merge", "re-fit", "code windows", "code bits/byte",
               "Δ code ppl % (± SE)", "prose bits/byte", "Δ prose ppl % (± SE)", "parameter bytes"])
    t.columns[5] = "windows code / prose"
    order = {c: i for i, c in enumerate(("unpruned",) + CRITERIA)}
    rows.sort(key=lambda r: (r["code_every"] != 1, r["pruned"], r["calib"] != "code", bool(r.get("merge")),
                             bool(r.get("refit")), order.get(r["criterion"], 99)))
    for r in rows:
        pair = bases.get((r["code_every"], r.get("prose_every", 1)))
        if pair is None:
            continue  # no unpruned run on the same windows
        dc, sc = _delta(r["code_nll"], pair["code_nll"])
        dp, sp = _delta(r["prose_nll"], pair["prose_nll"])
        t.rows.append([
            f"{int(r['pruned'] * 100)}%", r["criterion"], r["calib"], "yes" if r.get("merge") else "",
            _refit_cell(r), _windows(r),
            f"{_bpb(r['code_nll']):.4f}", f"{dc:+.2f} ± {sc:.2f}", f"{_bpb(r['prose_nll']):.4f}", f"{dp:+.2f} ± {sp:.2f}",
            f"{r['parameter_bytes']:,}",
        ])
    calib = sorted({(r["calib"], round(r["calibration_seconds"], 1)) for r in rows if r["calib"] != "-"})
    from memc.reference import corpus

    t.notes += [
        f"ref-moe (4.08M params, 16 experts top-2 x 4 layers), held-out split of the offline corpus: code "
        f"{len(corpus.held_out_bytes('code')) // CONTEXT} windows, prose {len(corpus.held_out_bytes('prose')) // CONTEXT} "
        f"windows of {CONTEXT} bytes. Rows with plain window counts score the whole held-out sets; '1/N' marks an "
        "unselected sample (windows 0, N, 2N, ...; the shared 2-core machine had too little CPU for every "
        "configuration on the whole sets). Every row is paired with the unpruned model on the same windows.",
        f"Calibration: moe-calibrate on {CALIB_WINDOWS} train-split windows of {CONTEXT} bytes; pass time "
        + ", ".join(f"{d}: {s:.0f} s" for d, s in calib) + " (batched_mm graph, 1 thread, shared CPU; the grouped-experts "
        "form moe-calibrate runs now took 64 s for the code windows in `memc compile`). "
        "Re-fit: KL to the unpruned model by Adam (linear warm-up, cosine decay): 'router' trains the kept router rows "
        "on the calibration windows (lr 5e-3); 'router+experts' also the kept experts' weights, on fresh train-split "
        "windows of the calibration domain (one window per step). The re-fit time is inside the pass time.",
        f"CPU: {cpu_model()}; {os.cpu_count()} cores shared with other jobs, 1 thread per run.",
    ]
    t.raw = {"rows": [{k: v for k, v in r.items() if not k.endswith("_nll")} for r in rows]}
    points = []
    for r in rows:
        pair = bases.get((r["code_every"], r.get("prose_every", 1)))
        if pair is not None and r["calib"] in ("code", "-") and not r.get("merge"):
            points.append((r, _delta(r["code_nll"], pair["code_nll"])))
    path = t.write()
    print(t.markdown())
    print(f"wrote {path} and {plot(points, path.with_suffix('.png'))}")


def plot(points: list[tuple[dict, tuple[float, float]]], out: Path) -> Path:
    """Δ held-out code per-byte perplexity (± paired SE) against the fraction of experts pruned, one line per
    criterion (code calibration), re-fitted variants as their own lines; the bars of the issue as dotted marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, float]]] = {}
    for r, (delta, se) in points:
        if r["criterion"] == "unpruned":
            continue
        name = r["criterion"] + (f" + re-fit ({_refit_cell(r).split(',')[0]})" if r.get("refit") else "")
        if r["code_every"] == 1:
            name += " [whole set]"
        series.setdefault(name, []).append((100 * r["pruned"], delta, se))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [max(p[1], 0.05) for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=name)
    ax.scatter([50, 75], [2.5, 30], marker="_", s=400, color="black", label="bar (issue 10)")
    ax.set_xlabel("experts pruned (%)")
    ax.set_ylabel("Δ held-out code per-byte perplexity (%)")
    ax.set_yscale("log")
    ax.set_xticks([25, 50, 75])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--configs", required=True, help=f"comma-separated groups: {', '.join(GROUPS)}")
    r.add_argument("--code-every", type=int, default=32, help="score every Nth held-out code window (not headline)")
    r.add_argument("--prose-every", type=int, default=2, help="score every Nth held-out prose window (not headline)")
    r.add_argument("--best", default="reap", help="criterion of the headline and variant rows")
    r.add_argument("--refit-steps", type=int, default=200, help="heal groups: re-fit steps (router + kept experts)")
    r.add_argument("--refit-windows", type=int, default=128, help="heal groups: train-split windows re-fitted on")
    r.add_argument("--refit-lr", type=float, default=1e-3, help="heal groups: peak learning rate")
    sub.add_parser("table")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cmd_run(args) if args.cmd == "run" else cmd_table(args)


if __name__ == "__main__":
    main(sys.argv[1:])
