"""Where prefill time goes: ref-llama's quantized artifact (an ILP plan) vs its fp32 artifact, 1024 tokens, 1 thread.

    python -m benchmarks.quant_prefill_profile [--plan "3 bits/param"] [--turns 6] [--profile-runs 3]

Both artifacts are built here with the current lowering from the same captured program: fp32 (the onnx target as
is) and the plan stored in benchmarks/results/mixed_bits.json, quantized with RTN (GPTQ gives the same shapes,
formats and bytes, so the same kernels and speed), as built (MatMulNBits accuracy level 0) and with int8
activations (level 4). Prefill tokens/s: median over ``--turns`` runs per artifact, taking turns with the order
reversed every turn. Per op type: onnxruntime's profiler (kernel time summed per op type, mean over
``--profile-runs`` runs after one warm-up), in a separate session.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, Table, cpu_info, ort_session

CONTEXT = 1024


def _by_op(path: Path, feeds: dict, runs: int, prefix: str) -> tuple[dict[str, float], dict[str, float]]:
    """Kernel milliseconds per run by op type, and by node."""
    s = ort_session(path, prefix)
    for _ in range(runs + 1):
        s.run(None, feeds)
    events = json.loads(Path(s.end_profiling()).read_text())
    ops: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ops[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1)
            nodes[e["name"][: -len("_kernel_time")]] += e["dur"] / 1e3 / (runs + 1)
    return dict(ops), dict(nodes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--plan", default="3 bits/param", help="a plan label in benchmarks/results/mixed_bits.json")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--profile-runs", type=int, default=3)
    ap.add_argument("--out", default="", help="keep the artifacts here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from benchmarks.quant_prefill import with_level
    from memc.capture import capture
    from memc.config import TargetConfig, ToolchainConfig
    from memc.passes.base import PassContext
    from memc.passes.quant.quantize import PLAN, Quantize, QuantizeOptions
    from memc.targets.onnxruntime import MODEL_FILE, OnnxRuntimeTarget

    plan = json.loads((RESULTS / "mixed_bits.json").read_text())["raw"]["plans"][args.plan]
    program = capture(args.model, ToolchainConfig())
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 4096, (1, CONTEXT)).astype(np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        fp, q = root / "fp32", root / "quant"
        fp.mkdir(parents=True, exist_ok=True)
        q.mkdir(parents=True, exist_ok=True)
        OnnxRuntimeTarget(TargetConfig()).build(program, fp)
        p = program.replace(module=copy.deepcopy(program.module), annotations={PLAN: plan}, log=[])
        res = Quantize(QuantizeOptions(method="rtn")).run(p, PassContext(seed=0))
        target = OnnxRuntimeTarget(TargetConfig())
        target.build(res.program, q)
        worst = max(target.verify(res.program, q, [tuple(torch.from_numpy(v) for v in feeds.values())]).worst.values())
        cases = {"fp32": fp / MODEL_FILE, "quantized, accuracy level 0": q / MODEL_FILE,
                 "quantized, accuracy level 4": with_level(q / MODEL_FILE, q / "model-acc4.onnx", 4)[0],
                 "quantized, level per format": with_level(q / MODEL_FILE, q / "model-auto.onnx", -1)[0]}
        sessions = {k: ort_session(v) for k, v in cases.items()}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for name, s in sessions.items():
            s.run(None, feeds)  # warm-up
        for turn in range(args.turns):
            for name in list(cases) if turn % 2 == 0 else reversed(list(cases)):
                t = time.perf_counter()
                sessions[name].run(None, feeds)
                times[name].append(time.perf_counter() - t)
        profiles = {k: _by_op(v, feeds, args.profile_runs, str(root / k.split(",")[0].replace(" ", "_")))
                    for k, v in cases.items()}
        sizes = {k: v.stat().st_size for k, v in cases.items()}
    speed = {k: CONTEXT / float(np.median(v)) for k, v in times.items()}
    ops = sorted({o for ops, _ in profiles.values() for o in ops}, key=lambda o: -max(p[0].get(o, 0) for p in profiles.values()))
    cols = list(cases)
    rows = [["prefill tok/s (median, in turns)", *(f"{speed[k]:,.0f}" for k in cols)],
            ["model.onnx bytes", *(f"{sizes[k]:,}" for k in cols)],
            ["kernel ms per run, all ops", *(f"{sum(profiles[k][0].values()):.1f}" for k in cols)]]
    for o in ops[:10]:
        rows.append([f"kernel ms: {o}", *(f"{profiles[k][0].get(o, 0):.1f}" for k in cols)])
    top = {k: sorted(profiles[k][1].items(), key=lambda x: -x[1])[:6] for k in cols}
    t = Table("quant_prefill_profile", f"python -m benchmarks.quant_prefill_profile --plan '{args.plan}' --turns {args.turns}",
              ["measure", *cols], rows,
              [f"ref-llama, plan {args.plan!r} of benchmarks/results/mixed_bits.json quantized with RTN (same formats and "
               f"bytes as GPTQ), {CONTEXT} random token ids, one thread; artifact vs torch max |Δ| {worst:.2g} (level 0). "
               f"CPU: {cpu_info()}. The machine is shared: tok/s are medians of {args.turns} runs per artifact taken in "
               "turns; kernel ms from a separate profiled session (mean of the runs)."],
              {"speed": speed, "times": times, "sizes": sizes, "ops": {k: v[0] for k, v in profiles.items()},
               "top_nodes": top, "max_abs_diff": worst})
    print(t.markdown())
    print(f"wrote {t.write()}")


if __name__ == "__main__":
    main()
