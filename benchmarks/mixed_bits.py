"""Mixed-precision weights on ref-llama: memc's ILP allocation vs uniform RTN / GPTQ at the same bytes.

    python -m benchmarks.mixed_bits [--model models/ref-llama] [--stride 8] [--artifacts]

Quality: held-out code bits/byte of the fake-quant program in torch (the ONNX artifact matches it within 1e-4 in
exact-check mode, tests/passes/quant), on every ``stride``-th window of 1024 tokens (an unselected sample;
``--stride 1`` is the whole set), as Δ per-byte perplexity vs fp32 with the paired standard error over windows.
Bytes: model.onnx bytes predicted as the measured graph bytes (quant-sensitivity's trial lowering) plus each
tensor's exact container bytes; ``--artifacts`` also builds the ILP artifacts and reports their bytes on disk and
prefill tokens/s at 1024 tokens (one thread) against the fp32 artifact.

``--distill-steps N`` adds, at each ILP budget, the same plan quantized by the ``quantize`` pass with
post-quantization distillation (memc.passes.quant.distill: KL to the fp32 program on train-split windows; trained
scales and norm weights, same formats and bytes); that program is evaluated as it is (its packed codes and scales,
in torch) and, with ``--artifacts``, lowered as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import RESULTS, Table, median_seconds

CONTEXT = 1024


def _program(model: str):
    from memc.capture import capture
    from memc.config import ToolchainConfig

    cfg = ToolchainConfig()
    cfg.calibration.source = "trainsplit:code"
    cfg.calibration.num_samples = 8
    cfg.calibration.seq_len = 512
    return capture(model, cfg), cfg


def _windows(program, stride: int):
    from memc.eval.backends import TorchBackend
    from memc.eval.text import load_text, text_codec, tokenize

    info = TorchBackend(program).info
    ids, spans = tokenize(load_text("heldout:code"), info, text_codec(info))
    n = len(ids) // CONTEXT
    pick = np.arange(0, n, stride)
    return ids[: n * CONTEXT].reshape(n, CONTEXT)[pick], spans[: n * CONTEXT].reshape(n, CONTEXT)[pick], n


def _bits_per_window(program, windows) -> np.ndarray:
    from memc.eval.perplexity import log_softmax_nll

    out = []
    for w in windows:
        logits = program(torch.from_numpy(w[None]))[0].float().numpy()
        out.append(float(log_softmax_nll(logits[:, :-1], w[None, 1:]).sum()) / math.log(2))
    return np.array(out)


def _fake_quant(program, formats: dict, method: str, calib, act_order: bool = False) -> tuple:
    """A copy of the program with the quantized tensors' dequantized weights, and their stored bytes (a format
    onnxruntime cannot store, e.g. 3-bit, counted densely packed: it exists only as torch fake-quant)."""
    from memc.passes.quant.quantize import QuantizeOptions, gptq_all, rtn_all
    from memc.quant.sites import find_weights

    p = program.replace(module=copy.deepcopy(program.module), annotations={}, log=[])
    weights, _ = find_weights(p)
    fmts = {w.name: formats[w.name] for w in weights if not formats[w.name].keep}
    opts = QuantizeOptions(act_order=act_order)
    q = gptq_all(p, weights, fmts, calib, opts) if method == "gptq" else rtn_all(p, weights, fmts)
    params = dict(p.module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for w in weights:
            if w.name in q:
                params[w.targets[0]].copy_(q[w.name].dequantize())
    by_name = {w.name: w for w in weights}
    stored = sum(t.nbytes() if t.fmt.accepted_by("onnx") else t.fmt.nbytes(by_name[n].shape, "dense")
                 for n, t in q.items()) + sum(w.numel * 4 for w in weights if w.name not in q)
    return p, stored


def _delta(bits: np.ndarray, base: np.ndarray, nbytes: np.ndarray) -> tuple[float, float]:
    """Δ per-byte perplexity (%) and its paired standard error (%), windows as the unit."""
    bpb, bpb0 = bits.sum() / nbytes.sum(), base.sum() / nbytes.sum()
    d = (bits - base) / nbytes  # per-window bits/byte difference
    se = d.std(ddof=1) / math.sqrt(len(d)) * (nbytes.mean() * len(d) / nbytes.sum())
    ratio = 2 ** (bpb - bpb0)
    return 100 * (ratio - 1), 100 * ratio * math.log(2) * se


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--artifacts", action="store_true", help="also build the ILP artifacts (bytes on disk, prefill speed)")
    ap.add_argument("--cache-dir", default="~/.cache/memc/sensitivity")
    ap.add_argument("--out", default="", help="keep the built artifacts here (default: a temporary directory)")
    ap.add_argument("--gptq-samples", type=int, default=8, help="calibration batches for GPTQ's Hessians (the "
                    "shipped toolchain uses all 8)")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ sweeps columns by decreasing Hessian diagonal (the quantize pass's default)")
    ap.add_argument("--rows", default="all", choices=["all", "ilp", "uniform", "none"],
                    help="which rows this run measures (two runs on two cores, then --merge); none: only write "
                    "the --merge runs, in that order, as results/NAME")
    ap.add_argument("--name", default="mixed_bits", help="results/NAME.{md,json}")
    ap.add_argument("--merge", default="", help="append the rows of results/NAME.json (another --rows / --budgets "
                    "run; comma-separated for several)")
    ap.add_argument("--skip-plain", action="store_true", help="with --distill-steps: only the distilled ILP rows "
                    "(saves the plain rows' evaluation where CPU time is short)")
    ap.add_argument("--budgets", default="", help="comma-separated ILP budget labels to measure (default: all; "
                    "to split the ILP rows over processes)")
    ap.add_argument("--fp32-artifact", default="", help="an fp32 model.onnx of the same model for the speed baseline")
    ap.add_argument("--artifact-budgets", default="", help="comma-separated budget labels to build (default: all)")
    ap.add_argument("--distill-steps", type=int, default=0, help="also ILP + distillation rows (0 = none)")
    ap.add_argument("--distill-scope", default="scales", choices=["scales", "scales+weights"])
    ap.add_argument("--distill-lr", type=float, default=2e-3)
    ap.add_argument("--distill-weight-lr", type=float, default=1e-2)
    ap.add_argument("--distill-windows", type=int, default=32, help="train-code windows of 512 tokens, 2 per step")
    args = ap.parse_args()
    if args.rows == "none":
        return _merge_only(args.name, args.merge)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from memc.calibration import calibration_samples
    from memc.passes.base import PassContext
    from memc.passes.quant.allocate import AllocateBits, AllocateOptions
    from memc.passes.quant.graph_bytes import measure_graph_bytes
    from memc.passes.quant.quantize import PLAN
    from memc.passes.quant.sensitivity import DEFAULT_CANDIDATES, SENSITIVITY, QuantSensitivity, SensitivityOptions
    from memc.quant.formats import KEEP, parse_format
    from memc.quant.sites import find_weights

    program, cfg = _program(args.model)
    calib = calibration_samples(program, cfg.calibration, cfg.inputs, cfg.seed)
    windows, spans, total_windows = _windows(program, args.stride)
    nbytes = spans[:, 1:].sum(1).astype(np.float64)
    params, _ = program.parameter_stats()
    weights, _ = find_weights(program)
    print(f"{len(windows)} of {total_windows} windows; {params:,} parameters", flush=True)

    t0 = time.perf_counter()
    candidates = DEFAULT_CANDIDATES
    ctx = PassContext(seed=0, calibration=calib, config=cfg)
    sens = QuantSensitivity(SensitivityOptions(candidates=candidates, cache_dir=args.cache_dir)).run(program, ctx)
    graph = program.annotations[SENSITIVITY]["graph_bytes"]
    print(f"sensitivity {time.perf_counter() - t0:.0f} s (cached: {sens.metrics['cached']}); graph bytes {graph:,}", flush=True)

    base = _bits_per_window(program, windows)
    fp_bpb = base.sum() / nbytes.sum()
    rows, raw = [], {"fp32_bits_per_byte": fp_bpb, "windows": len(windows), "total_windows": total_windows}
    gptq_calib = calib[: args.gptq_samples]
    distill_opts = {"act_order": args.act_order, "distill_steps": args.distill_steps, "distill_scope": args.distill_scope,
                    "distill_lr": args.distill_lr, "distill_weight_lr": args.distill_weight_lr,
                    "distill_windows": args.distill_windows, "distill_context": 512, "distill_batch": 2}
    command = "python -m benchmarks.mixed_bits " + " ".join(
        a for a in (f"--stride {args.stride}", f"--gptq-samples {args.gptq_samples}",
                    "" if args.act_order else "--no-act-order", f"--rows {args.rows}" if args.rows != "all" else "",
                    "--artifacts" if args.artifacts else "", "--skip-plain" if args.skip_plain else "", f"--budgets '{args.budgets}'" if args.budgets else "",
                    (f"--distill-steps {args.distill_steps} --distill-scope {args.distill_scope} --distill-lr "
                     f"{args.distill_lr} --distill-weight-lr {args.distill_weight_lr} --distill-windows "
                     f"{args.distill_windows}") if args.distill_steps else "") if a)
    notes = [f"ref-llama, held-out code, {len(windows)} of {total_windows} windows of {CONTEXT} tokens (every "
             f"{args.stride}th), fp32 {fp_bpb:.4f} bits/byte; Δ = per-byte perplexity vs fp32 ± paired SE over windows; "
             f"bytes = model.onnx as predicted: graph bytes measured by a trial lowering of that point's formats (ILP rows: "
             f"the allocate pass's measurement of its plan; int3 rows: {graph:,}, the cheapest-candidate lowering) + "
             f"exact container bytes of every tensor; sensitivity: fisher on {len(calib)} train-code batches of 2 x 512 tokens; GPTQ "
             f"Hessians from the first {len(gptq_calib)} of them{' (act-order)' if args.act_order else ''}; int3 rows: torch "
             f"fake-quant only (onnxruntime CPU cannot store 3-bit), bytes counted densely packed (3 bits a code)."]
    target = program.annotations[SENSITIVITY]["target"]

    def graph_of(formats: dict) -> int:
        """model.onnx bytes besides the weights for these formats (the lowering's graph depends on them); a format
        onnxruntime cannot store (3-bit) gets the cheapest-candidate measurement."""
        if not all(f.keep or f.accepted_by("onnx") for f in formats.values()):
            return graph
        return measure_graph_bytes(program, weights, {n: f.name for n, f in formats.items()}, target)

    table = Table(args.name, command, ["point", "quantizer", "bytes", "bits/param", "bits/byte", "Δ ppl/byte"],
                  rows, notes, raw)
    raw["notes"] = table.notes  # the same list: artifact notes added later reach another run's --merge too

    def point(label: str, formats: dict, method: str, built=None, overhead: int | None = None) -> tuple[int, float, float]:
        t = time.perf_counter()
        p, stored = built[:2] if built else _fake_quant(program, formats, method, gptq_calib, args.act_order)
        size = (graph_of(formats) if overhead is None else overhead) + stored
        bits = _bits_per_window(p, windows)
        d, se = _delta(bits, base, nbytes)
        rows.append([label, method, f"{size / 1e6:.3f} MB", f"{8 * size / params:.2f}",
                     f"{bits.sum() / nbytes.sum():.4f}", f"{d:+.2f}% ± {se:.2f}"])
        raw[f"{label} [{method}]"] = {"bytes": size, "delta_pct": d, "se_pct": se, "method": method,
                                      "seconds": time.perf_counter() - t + (built[2] if built else 0.0)}
        print(rows[-1], f"{time.perf_counter() - t:.0f} s", flush=True)
        _merged(table, args.merge).write()  # partial results survive an interrupted run
        return size, d, se

    uniform = lambda name: {w.name: parse_format(name) for w in weights}  # noqa: E731
    int4 = sum(parse_format("int4-g128").nbytes(w.shape) for w in weights) + graph_of(uniform("int4-g128"))
    budgets = {"int4-g128 size": int4, "3 bits/param": int(3 * params / 8), "2.5 bits/param": int(2.5 * params / 8)}
    plans, distilled = {}, {}
    unknown = set(filter(None, args.budgets.split(","))) - set(budgets)
    if unknown:
        raise SystemExit(f"--budgets: unknown {sorted(unknown)}; choose from {list(budgets)}")
    for label, budget in budgets.items() if args.rows != "uniform" else ():
        if args.budgets and label not in args.budgets.split(","):
            continue
        program.annotations.pop(PLAN, None)
        alloc = AllocateBits(AllocateOptions(budget=str(budget))).run(program, ctx)
        plan = {k: parse_format(v) for k, v in program.annotations[PLAN].items()}
        plans[label] = dict(program.annotations[PLAN])
        raw[f"ilp {label}"] = {"budget": budget, "solver": alloc.metrics["solver"],
                               "solver_seconds": alloc.metrics["solver_seconds"], "formats": alloc.metrics["formats"],
                               "table": alloc.metrics["table"]}
        print(label, budget, alloc.metrics["formats"], f"{alloc.metrics['solver_seconds']:.3f} s", flush=True)
        if not (args.skip_plain and args.distill_steps):
            point(f"memc ILP @ {label} ({budget / 1e6:.3f} MB)", {w.name: plan.get(w.name, KEEP) for w in weights}, "gptq",
                  overhead=alloc.metrics["overhead_bytes"])
        if args.distill_steps:
            built = _distilled(program, plans[label], distill_opts, PassContext(seed=0, calibration=gptq_calib, config=cfg))
            distilled[label] = built[0]
            raw[f"distill {label}"] = built[3]
            point(f"memc ILP + distill @ {label} ({budget / 1e6:.3f} MB)", {}, "gptq+kd", built[:3],
                  overhead=alloc.metrics["overhead_bytes"])
    raw["plans"] = plans
    gptq_points = ("int4-g128", "int3-g128", "int2-g32", "int2-g128")  # at (or under) the ILP points' bytes
    for name in gptq_points if args.rows != "ilp" else ():
        point(f"uniform {name}", uniform(name), "gptq")
    for name in ("int4-g128", "int3-g128", "int2-g32", "int2-g64", "int8-g128") if args.rows != "ilp" else ():
        point(f"uniform {name}", uniform(name), "rtn")
    print(_merged(table, args.merge).markdown())
    print(f"wrote {_merged(table, args.merge).write()}", flush=True)
    print(f"wrote {plot(RESULTS / f'{args.name}.json')}", flush=True)
    if args.artifacts:
        gctx = PassContext(seed=0, calibration=gptq_calib, config=cfg)
        table.notes += _artifacts(program, plans, budgets, raw, gctx, args.out, args.fp32_artifact,
                                  args.artifact_budgets, distilled, args.act_order)
        print(_merged(table, args.merge).markdown())
        print(f"wrote {_merged(table, args.merge).write()}")


def _merged(table: Table, names: str) -> Table:
    """``table`` plus the rows, raw entries and notes of results/NAME.json (a run of the other ``--rows``), for each
    of the comma-separated ``names``."""
    import json

    if "," in names:
        for name in names.split(","):
            table = _merged(table, name)
        return table
    name = names
    if not name:
        return table
    path = RESULTS / f"{name}.json"
    if not path.exists():
        print(f"--merge: {path} not written yet; this table has only its own rows", flush=True)
        return table
    other = json.loads(path.read_text())
    raw = {**table.raw, **{k: v for k, v in other["raw"].items() if k not in table.raw}}
    return dataclasses.replace(table, rows=table.rows + [r for r in other["rows"] if r not in table.rows], raw=raw,
                               notes=table.notes + [n for n in other["raw"].get("notes", []) if n not in table.notes]
                               + [f"rows merged from `{other['command']}`"])


def _merge_only(name: str, names: str) -> None:
    """``--rows none``: the first of the comma-separated ``names`` followed by the others, as results/NAME."""
    import json

    first, *rest = [n for n in names.split(",") if n] or [""]
    if not first:
        raise SystemExit("--rows none: name the runs to merge with --merge")
    data = json.loads((RESULTS / f"{first}.json").read_text())
    table = _merged(Table(name, data["command"], data["columns"], data["rows"], data["raw"].get("notes", []),
                          data["raw"]), ",".join(rest))
    print(table.markdown())
    print(f"wrote {table.write()}")
    print(f"wrote {plot(RESULTS / f'{name}.json')}", flush=True)


def _distilled(program, plan: dict, opts: dict, ctx) -> tuple:
    """The ``quantize`` pass (GPTQ + distillation) on a copy: (program, stored bytes, seconds, distill metrics)."""
    from memc.passes.quant.quantize import PLAN, Quantize, QuantizeOptions

    t = time.perf_counter()
    p = program.replace(module=copy.deepcopy(program.module), annotations={PLAN: plan}, log=[])
    steps = opts["distill_steps"]

    @contextlib.contextmanager
    def progress(total, what):
        done = [0]

        def advance(n=1):
            done[0] += n
            if done[0] % 50 == 0 or done[0] == total:
                print(f"  {what}: {done[0]}/{total} steps, {time.perf_counter() - t:.0f} s", flush=True)
        yield advance

    ctx = dataclasses.replace(ctx, progress_factory=progress)
    res = Quantize(QuantizeOptions(method="gptq", **opts)).run(p, ctx)
    m = dict(res.metrics["distill"], seconds=time.perf_counter() - t)
    print(f"  distill ({steps} steps): KL {m['kl_before']:.4f} -> {m['kl_after']:.4f}, {m['seconds']:.0f} s", flush=True)
    stored = res.metrics["quantized_bytes"] + res.metrics["kept_weight_bytes"]
    return res.program, stored, m["seconds"], {k: v for k, v in m.items() if k != "float_params"}


def _with_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    """A copy of an artifact whose MatMulNBits nodes compute with ``accuracy_level`` (4: int8 activations)."""
    import onnx

    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    onnx.save_model(model, str(dst))
    return dst


def _artifacts(program, plans, budgets, raw, ctx, keep_dir: str = "", fp32: str = "", only: str = "",
               distilled: dict | None = None, act_order: bool = False) -> list[str]:
    """Build each ILP artifact with the onnx target (the distilled program where there is one); bytes on disk vs
    predicted; prefill speed vs fp32 (exact-check accuracy level 0 as built, and the same file with int8
    activations, accuracy level 4)."""
    import tempfile

    from memc.config import TargetConfig
    from memc.passes.quant.quantize import PLAN, Quantize, QuantizeOptions
    from memc.targets.onnxruntime import MODEL_FILE, OnnxRuntimeTarget
    from memc.targets.session import create_session

    notes = []
    ids = np.random.default_rng(0).integers(0, 4096, (1, CONTEXT)).astype(np.int64)

    def prefill(path) -> float:
        sess = create_session(path, threads=1)
        return CONTEXT / median_seconds(lambda: sess.run(None, {"input_ids": ids}), repeats=5)

    with (contextlib.nullcontext(keep_dir) if keep_dir else tempfile.TemporaryDirectory()) as tmp:
        if fp32:
            fp_model = Path(fp32)
        else:
            fp = Path(tmp) / "fp32"
            fp.mkdir(parents=True, exist_ok=True)
            OnnxRuntimeTarget(TargetConfig()).build(program, fp)
            fp_model = fp / MODEL_FILE
        for label, plan in plans.items():
            if only and label not in only.split(","):
                continue
            kd = (distilled or {}).get(label)
            if kd is None:
                p = program.replace(module=copy.deepcopy(program.module), annotations={PLAN: plan}, log=[])
                built = Quantize(QuantizeOptions(method="gptq", act_order=act_order)).run(p, ctx).program  # ctx: the GPTQ calibration
            else:
                built = kd
            out = Path(tmp) / label.replace(" ", "_").replace("/", "_")
            out.mkdir(parents=True, exist_ok=True)
            target = OnnxRuntimeTarget(TargetConfig())
            target.build(built, out)
            v = target.verify(built, out, ctx.calibration[:1])
            size = (out / MODEL_FILE).stat().st_size
            speed = prefill(out / MODEL_FILE)
            fp_speed = prefill(fp_model)  # timed next to each artifact: neighbours' load drifts over the run
            raw.setdefault("fp32_artifact", {"bytes": fp_model.stat().st_size, "prefill_tok_s": []})["prefill_tok_s"].append(fp_speed)
            speed4 = prefill(_with_accuracy_level(out / MODEL_FILE, out / "model-acc4.onnx", 4))
            kind = "memc ILP @" if kd is None else "memc ILP + distill @"
            predicted = raw[f"{kind} {label} ({budgets[label] / 1e6:.3f} MB) [{'gptq' if kd is None else 'gptq+kd'}]"]["bytes"]
            raw[f"artifact {label}" + (" (distilled)" if kd is not None else "")] = {"bytes": size, "predicted": predicted, "budget": budgets[label],
                                        "max_abs_diff": v.worst, "prefill_tok_s": speed, "prefill_tok_s_acc4": speed4}
            notes.append(f"artifact @ {label}{' (ILP + distill)' if kd is not None else ''}: model.onnx {size:,} B (predicted {predicted:,}, budget {budgets[label]:,}; "
                         f"{100 * (size - predicted) / predicted:+.2f}%), max |Δ| vs torch {max(v.worst.values()):.2g}, "
                         f"prefill {speed:,.0f} tok/s (accuracy level 0; {speed4:,.0f} with int8 activations, level 4) vs fp32 "
                         f"{fp_speed:,.0f} at {CONTEXT} tokens, 1 thread")
            print(notes[-1], flush=True)
    return notes


def plot(json_path: Path = Path(__file__).parent / "results" / "mixed_bits.json") -> Path:
    """Size vs quality: Δ per-byte perplexity (± SE) against model.onnx bytes, one series per quantizer."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = json.loads(json_path.read_text())["raw"]
    series: dict[str, list] = {}
    for label, v in raw.items():
        if not isinstance(v, dict) or "delta_pct" not in v:
            continue
        kind = ("memc ILP (GPTQ + distill)" if "distill" in label else "memc ILP (GPTQ)") if label.startswith("memc") \
            else f"uniform {v.get('method', '?').upper()}"
        series.setdefault(kind, []).append((v["bytes"] / 1e6, v["delta_pct"], v["se_pct"], label.split(" [")[0]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name, linestyle="-" if name.startswith("memc") else "none")
        for x, y, _, label in pts:
            ax.annotate(label.replace("uniform ", "").split(" (")[0].replace("memc ILP + distill @ ", "").replace(
                "memc ILP @ ", ""), (x, y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("model.onnx bytes (MB)")
    ax.set_ylabel("Δ per-byte perplexity vs fp32 (%)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = json_path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    main()
