"""Prefill speed and quality of ref-llama's mixed-bits artifacts vs its fp32 artifact, all built by the toolchains.

    python -m benchmarks.quant_prefill [--budgets 2273258B,3bits] [--levels 0,-1] [--turns 12]
                                       [--distill-steps N] [--stride 1] [--out DIR]

Artifacts: ``memc compile MODEL`` (fp32, the default toolchain) and ``memc compile MODEL -c toolchains/mixed-bits.toml
--budget B`` for each budget (GPTQ + distillation with the toolchain's own settings unless ``--distill-steps`` says
otherwise, for quick runs), built at the shipped MatMulNBits accuracy level 0 (float32 compute, verified against the
torch program at 1e-4). Each other ``--levels`` entry L is that model.onnx with every MatMulNBits node's
``accuracy_level`` set as ``--set pipeline.2.accuracy_level=L`` would lower it (memc.quant.speed.level_for; -1 = the
measured fastest level per format): the level is a kernel attribute only, so GPTQ, distillation, codes, scales and
bytes are the same.

Speed: prefill tokens/s at 1024 tokens (random ids, seed 0), one thread, every session in one process taking turns
(the order reversed every turn), wall and CPU time (``time.process_time``) per run; medians; ratio vs fp32 of the same
turns. Quality through onnxruntime (memc eval's machinery, memc.eval.perplexity / paired): per-byte perplexity Δ vs
the fp32 artifact with the paired standard error over every ``--stride``-th 1024-token window of held-out code
(``--stride 1``: all 392); max |Δ| of each artifact's logits vs its torch program (the compile's program, two
held-out windows).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, Table, cpu_info, ort_session

CONTEXT = 1024
TOOLCHAIN = Path(__file__).resolve().parent.parent / "toolchains" / "mixed-bits.toml"


def pipeline_index(name: str, toolchain: Path = TOOLCHAIN) -> int:
    """Index of pass ``name`` in the toolchain's pipeline (the key ``--set pipeline.N.option`` uses)."""
    passes = [e.get("pass") for e in tomllib.loads(toolchain.read_text())["pipeline"]]
    if name not in passes:
        raise SystemExit(f"{toolchain} has no {name!r} pass (pipeline: {passes})")
    return passes.index(name)


def with_level(src: Path, dst: Path, level: int) -> tuple[Path, dict[int, int]]:
    """A copy of ``src`` whose MatMulNBits nodes compute at ``level`` as the quantize pass lowers it (-1: the level
    memc.quant.speed measured fastest for the node's format); returns the path and {level: nodes}."""
    import onnx

    from memc.quant.formats import Format
    from memc.quant.speed import level_for

    model = onnx.load(str(src))
    counts: dict[int, int] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: x for x in node.attribute}
        a["accuracy_level"].i = level_for(Format("", a["bits"].i, a["block_size"].i), level)
        counts[a["accuracy_level"].i] = counts.get(a["accuracy_level"].i, 0) + 1
    onnx.save_model(model, str(dst))
    return dst, counts


def node_counts(path: Path) -> dict[str, int]:
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {op: ops.count(op) for op in ("MatMulNBits", "MatMul", "GroupQueryAttention", "Split")} | {"nodes": len(ops)}


def build(model: str, out: Path, budgets: list[str], distill_steps: int | None) -> dict[str, dict]:
    """fp32 and one mixed-bits artifact per budget, by memc.compile; {label: {dir, program, compile_s, report}}."""
    import memc

    built = {}
    t = time.perf_counter()
    res = memc.compile(model, output=out / "fp32", config={"seed": 0}, quiet=True)
    built["fp32"] = {"dir": out / "fp32", "program": res.program, "compile_s": time.perf_counter() - t}
    for budget in budgets:
        overrides = {f"pipeline.{pipeline_index('allocate-bits')}.budget": budget}
        if distill_steps is not None:
            overrides[f"pipeline.{pipeline_index('quantize')}.distill_steps"] = distill_steps
        t = time.perf_counter()
        res = memc.compile(model, output=out / f"q-{budget}", config=str(TOOLCHAIN), overrides=overrides, quiet=True)
        alloc = next(p for p in res.passes if p.name == "allocate-bits").metrics
        built[budget] = {"dir": out / f"q-{budget}", "program": res.program, "compile_s": time.perf_counter() - t,
                         "predicted": alloc["predicted_bytes"], "budget_bytes": alloc["budget_bytes"],
                         "formats": alloc["formats"], "verify": max(res.max_abs_diff.values())}
        print(f"built {budget}: {built[budget]['compile_s']:.0f} s, formats {alloc['formats']}", flush=True)
    return built


def prefill_times(paths: dict[str, Path], turns: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of one 1024-token prefill per session, sessions taking turns."""
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 4096, (1, CONTEXT)).astype(np.int64)}
    sessions = {k: ort_session(v) for k, v in paths.items()}
    for s in sessions.values():
        s.run(None, feeds)  # warm-up
    times = {k: {"wall": [], "cpu": []} for k in paths}
    for turn in range(turns):
        for k in (list(paths) if turn % 2 == 0 else list(reversed(paths))):
            w, c = time.perf_counter(), time.process_time()
            sessions[k].run(None, feeds)
            times[k]["cpu"].append(time.process_time() - c)
            times[k]["wall"].append(time.perf_counter() - w)
    return times


def heldout_windows(info, stride: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every ``stride``-th 1024-token window of held-out code: ids, bytes of each scored token, and how many there are."""
    from memc.eval.text import load_text, text_codec, tokenize

    ids, spans = tokenize(load_text("heldout:code"), info, text_codec(info))
    n = len(ids) // CONTEXT
    pick = np.arange(0, n, stride)
    return ids[: n * CONTEXT].reshape(n, CONTEXT)[pick], spans[: n * CONTEXT].reshape(n, CONTEXT)[pick, 1:], n


def _pct(d) -> str:
    """Δ per-byte perplexity and its paired SE, in percent (SE through d(2**δ)/dδ = 2**δ ln 2)."""
    return f"{100 * d.per_byte_ppl_change:+.3f}% ± {100 * 2 ** d.delta * np.log(2) * d.se:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--budgets", default="2273258B,3bits", help="comma-separated allocate-bits budgets")
    ap.add_argument("--levels", default="0,4,-1", help="MatMulNBits accuracy levels (0 first: the built artifact)")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--distill-steps", type=int, default=None, help="override the toolchain's (quick runs)")
    ap.add_argument("--stride", type=int, default=1, help="every N-th held-out window (1 = all 392)")
    ap.add_argument("--out", default="", help="keep the artifacts here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from memc.eval.backends import OnnxBackend
    from memc.eval.paired import paired_delta
    from memc.eval.perplexity import window_nll

    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        built = build(args.model, out, budgets, args.distill_steps)
        paths, level_counts = {"fp32": built["fp32"]["dir"] / "model.onnx"}, {}
        for b in budgets:
            src = built[b]["dir"] / "model.onnx"
            for level in levels:
                key = f"{b} @ level {level}"
                paths[key], level_counts[key] = with_level(src, built[b]["dir"] / f"model-level{level}.onnx", level)
        load = [os.getloadavg()[0]]
        times = prefill_times(paths, args.turns)
        load.append(os.getloadavg()[0])
        windows, spans, total = heldout_windows(OnnxBackend(paths["fp32"], threads=1).info, args.stride)
        nll, worst = {}, {}
        for key, path in paths.items():
            t = time.perf_counter()
            backend = OnnxBackend(path, threads=1)
            nll[key] = window_nll(backend, windows)
            program = built["fp32" if key == "fp32" else key.split(" @ ")[0]]["program"]
            with torch.no_grad():
                ref = [program(torch.from_numpy(w[None]))[0].float().numpy() for w in windows[:2]]
            worst[key] = max(float(np.abs(backend.forward({"input_ids": w[None]}) - r).max())
                             for w, r in zip(windows, ref))
            print(f"{key}: quality on {len(windows)} windows in {time.perf_counter() - t:.0f} s", flush=True)
        sizes = {k: v.stat().st_size for k, v in paths.items()}
        counts = {k: node_counts(v) for k, v in paths.items()}
        if args.out:
            for b in budgets:
                shutil.copy(built[b]["dir"] / "report.json", out / f"report-{b}.json")
    med = {k: {m: float(np.median(v[m])) for m in ("wall", "cpu")} for k, v in times.items()}
    rows, raw = [], {"load": load, "times": times, "sizes": sizes, "node_counts": counts, "levels": level_counts,
                     "max_abs_diff": worst, "quality": {}, "builds": {k: {x: y for x, y in v.items() if x not in ("program", "dir")}
                                               for k, v in built.items()}}
    for key in paths:
        d = paired_delta(nll["fp32"], nll[key], spans)
        raw["quality"][key] = d.as_dict()
        q = "—" if key == "fp32" else _pct(d)
        base, vs_base = key.split(" @ ")[0] + f" @ level {levels[0]}", "—"
        if key not in ("fp32", base):  # the level's own cost: the same plan at the first level, paired
            d0 = paired_delta(nll[base], nll[key], spans)
            raw["quality"][f"{key} vs {base}"] = d0.as_dict()
            vs_base = _pct(d0)
        c = counts[key]
        rows.append([key, f"{sizes[key]:,}", f"{CONTEXT / med[key]['wall']:,.0f}",
                     f"{med['fp32']['wall'] / med[key]['wall']:.3f}x", f"{1e3 * med[key]['cpu']:.1f}",
                     f"{med['fp32']['cpu'] / med[key]['cpu']:.3f}x", f"{d.bits_per_byte_b:.5f}", q, vs_base,
                     f"{worst[key]:.2g}", f"{c['MatMulNBits']} / {c['MatMul']} / {c['GroupQueryAttention']} / {c['nodes']}"])
    cmd = (f"python -m benchmarks.quant_prefill --budgets {','.join(budgets)} --levels {args.levels} --turns {args.turns}"
           + (f" --distill-steps {args.distill_steps}" if args.distill_steps is not None else "")
           + (f" --stride {args.stride}" if args.stride != 1 else ""))
    settings = "the toolchain settings" if args.distill_steps is None else f"distill steps {args.distill_steps}"
    notes = [f"ref-llama ({args.model}); fp32 = `memc compile` with the default toolchain; `B @ level L` = `memc compile "
             f"-c toolchains/mixed-bits.toml --budget B` ({settings}), "
             "its model.onnx with MatMulNBits accuracy_level L (-1: per format, memc.quant.speed; level 0 as built). "
             f"Prefill of {CONTEXT} random ids, one thread, {args.turns} turns of every session in one process (order "
             "reversed each turn), medians of wall and CPU (process_time) ms; ratios vs fp32 in the same turns. Quality "
             f"through onnxruntime on {len(windows)} of {total} held-out code windows of {CONTEXT} tokens: bits/byte, Δ "
             "per-byte perplexity vs the fp32 artifact (and vs the same plan at the first level) ± paired SE over "
             "windows; max |Δ| of the logits vs the torch program on the first two windows. Nodes: MatMulNBits / MatMul / GroupQueryAttention / all in model.onnx. "
             f"CPU: {cpu_info()}; 1-min load average {load[0]:.1f} before / {load[1]:.1f} after the timed turns."]
    for b in budgets:
        info = built[b]
        notes.append(f"{b}: predicted {info['predicted']:,} B, budget {info['budget_bytes']:,} B, on disk "
                     f"{sizes[f'{b} @ level {levels[0]}']:,} B; formats {info['formats']}; levels per node "
                     f"{ {k: v for k, v in level_counts.items() if k.startswith(b)} }; compile {info['compile_s']:.0f} s")
    t = Table("quant_prefill", cmd, ["artifact", "model.onnx bytes", "prefill tok/s (median)", "vs fp32",
                                     "CPU ms / prefill (median)", "CPU vs fp32", "bits/byte", "Δ per-byte ppl ± SE",
                                     f"Δ vs level {levels[0]} ± SE",
                                     "max |Δ| vs torch", "nodes"], rows, notes, raw)
    print(t.markdown())
    print(f"wrote {t.write()}")


if __name__ == "__main__":
    main()
