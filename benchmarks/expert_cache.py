"""The expert-cache form of ref-moe (byte-level Qwen3-MoE, 16 experts top-2, 4 layers): exactness, hit rate per
layer, bytes resident and decode ms/token against the full decode artifact.

    python -m benchmarks.expert_cache compile            # memc compile ref-moe with C = 8 (+ decode.onnx) and C = 4,
                                                         # and decode.onnx in the concat KV layout
    python -m benchmarks.expert_cache run [--windows 16]

Text: the first ``--windows`` non-overlapping 256-byte windows of the held-out code split (memc.eval.text,
``heldout:code``; not selected). Per window each engine prefills 32 tokens, then steps one token at a time through
the other 224 (the expert cache keeps its slots across windows, like a server). Logits are compared with the torch
Program's and model.onnx's full-sequence logits of the window (max |Δ| over every position). Hit rates are over
the decode steps (k = 2 requests per token and layer); Belady's hit rate (best possible with knowledge of the
future, on the same per-token expert sets) is computed offline from the engine's trace. Every case runs in a fresh
process on one thread (benchmarks.harness), the engines taking turns window by window in one process; ms/token is
the median over all steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Table, cpu_info, run_case

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "ref-moe"
WORK = Path(os.environ.get("MEMC_BENCH_DIR", "/tmp/memc-bench-expert-cache"))
WINDOW, PREFILL = 256, 32
SLOTS = (8, 4)


def artifact(slots: int) -> Path:
    return WORK / f"ref-moe-c{slots}"


def windows(count: int) -> np.ndarray:
    from memc.eval.text import load_text

    data = np.frombuffer(load_text("heldout:code"), dtype=np.uint8).astype(np.int64)
    n = min(count, len(data) // WINDOW)
    return data[: n * WINDOW].reshape(n, WINDOW)


def compile_artifacts() -> None:
    for slots in SLOTS:
        args = [sys.executable, "-m", "memc", "compile", str(MODEL), "-o", str(artifact(slots)), "--no-progress",
                "--set", f"target.expert_cache.slots={slots}"]
        if slots == SLOTS[0]:
            args += ["--set", "target.decode_graph=true", "--set", "target.decode_steps=16"]
        subprocess.run(args, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    concat_decode()


def concat_decode() -> None:
    """decode.onnx of the same Program in the expert cache's KV layout (concat, no GroupQueryAttention)."""
    from memc.codegen.decode import build_decode_artifact

    (WORK / "ref-moe-concat").mkdir(parents=True, exist_ok=True)
    build_decode_artifact(MODEL, WORK / "ref-moe-concat", 23, attention="standard")


# -- cases (each in a fresh process, one thread) -------------------------------------------------------------------
def reference_case(count: int, out: str) -> dict:
    """The torch Program's and model.onnx's full-sequence logits of every window."""
    import torch

    from memc.codegen.decode import program_of
    from memc.runtime.artifact import load

    torch.set_num_threads(1)
    program = program_of(MODEL)
    ids = windows(count)
    with torch.no_grad():
        torch_logits = np.stack([program(torch.from_numpy(w[None]))[0].float().numpy()[0] for w in ids])
    model = load(artifact(SLOTS[0]), threads=1)
    onnx_logits = np.stack([model.run(w[None])[0][0] for w in ids])
    np.savez(out, torch=torch_logits, onnx=onnx_logits)
    return {"windows": int(len(ids)), "torch_vs_onnx": float(np.abs(torch_logits - onnx_logits).max())}


class _Run:
    """One engine's pass over the windows: logits, step times and (expert cache) decode-only slot counts."""

    def __init__(self, engine, ref: dict):
        self.engine, self.ref = engine, ref
        self.steps: list[float] = []
        self.diff_torch = self.diff_onnx = 0.0
        layers = getattr(engine, "layers", [])
        self.decode = np.zeros((len(layers), 2), dtype=np.int64)  # requests, hits over the decode steps only

    def _counts(self) -> np.ndarray:
        return np.array([(l.cache.stats.requests, l.cache.stats.hits) for l in self.engine.layers], np.int64)

    def window(self, i: int, w: np.ndarray) -> None:
        logits, state = self.engine.prefill(w[None, :PREFILL])
        parts = [logits]
        start = self._counts() if len(self.decode) else None
        for t in range(PREFILL, WINDOW):
            t0 = time.perf_counter()
            logits, state = self.engine.step(w[t:t + 1], state)
            self.steps.append(time.perf_counter() - t0)
            parts.append(logits)
        if start is not None:
            self.decode += self._counts() - start
        got = np.concatenate(parts, axis=1)[0].astype(np.float64)
        self.diff_torch = max(self.diff_torch, float(np.abs(got - self.ref["torch"][i]).max()))
        self.diff_onnx = max(self.diff_onnx, float(np.abs(got - self.ref["onnx"][i]).max()))

    def result(self) -> dict:
        return {"ms_per_token": 1e3 * statistics.median(self.steps), "steps": len(self.steps),
                "max_diff_torch": self.diff_torch, "max_diff_onnx": self.diff_onnx}


def engines_case(count: int, ref_file: str) -> dict:
    """The full decode artifact (decode.onnx, every expert resident) and the expert cache at each C, taking turns
    window by window in one process (so a change in machine load hits every engine alike)."""
    from memc.runtime.engine import DecodeEngine
    from memc.runtime.expert_cache import ExpertCacheEngine

    ref = dict(np.load(ref_file))
    runs = {"full": _Run(DecodeEngine(artifact(SLOTS[0]), threads=1), ref),
            "concat": _Run(DecodeEngine(WORK / "ref-moe-concat", threads=1), ref)}
    for slots in SLOTS:
        runs[slots] = _Run(ExpertCacheEngine(artifact(slots), threads=1, trace=True), ref)
    for i, w in enumerate(windows(count)):
        for run in runs.values():
            run.window(i, w)
    full, concat = runs.pop("full").result(), runs.pop("concat").result()
    full["weight_bytes"] = int((artifact(SLOTS[0]) / "decode.onnx").stat().st_size)
    caches = []
    per_window = 1 + WINDOW - PREFILL  # traced calls per window: the prefill, then one per step
    for slots, run in runs.items():
        engine, stats, result = run.engine, run.engine.stats(), run.result()
        per_layer = []
        for i in range(len(engine.layers)):
            sets = [list(dict.fromkeys(int(e) for e in ids.reshape(-1)))
                    for j, ids in enumerate(engine.trace[i]) if j % per_window != 0]
            per_layer.append({"layer": i, "lru_hit_rate_decode": float(run.decode[i, 1] / run.decode[i, 0]),
                              "decode_requests": int(run.decode[i, 0]), "belady_hit_rate_decode": _belady(sets, slots),
                              "hit_rate_all_calls": stats["layers"][i]["hit_rate"],
                              "loads": stats["layers"][i]["loads"], "load_ms": stats["layers"][i]["load_ms"]})
        result.update({"slots": slots, "layers": per_layer, "bytes_resident": stats["bytes_resident"],
                       "bytes_full": stats["bytes_full"], "slot_bytes": stats["slot_bytes"],
                       "segment_bytes": stats["segment_bytes"], "loads": stats["loads"]})
        caches.append(result)
    return {"full": full, "concat": concat, "caches": caches}


def _belady(sets: list[list[int]], slots: int) -> float:
    """Best possible hit rate over per-token expert sets: on a miss, evict the resident expert used farthest ahead."""
    nxt: list[dict[int, int]] = [dict() for _ in sets]
    upcoming: dict[int, int] = {}
    for t in range(len(sets) - 1, -1, -1):
        nxt[t] = dict(upcoming)
        for e in sets[t]:
            upcoming[e] = t
    resident: set[int] = set()
    hits = requests = 0
    for t, need in enumerate(sets):
        requests += len(need)
        hits += sum(e in resident for e in need)
        for e in need:
            if e in resident:
                continue
            if len(resident) >= slots:
                victims = [v for v in resident if v not in need]
                resident.remove(max(victims, key=lambda v: nxt[t].get(v, len(sets) + 1)))
            resident.add(e)
    return hits / requests


def run(count: int) -> None:
    ref_file = str(WORK / "reference.npz")
    ref = run_case("benchmarks.expert_cache:reference_case", count=count, out=ref_file)
    measured = run_case("benchmarks.expert_cache:engines_case", count=count, ref_file=ref_file)
    full, concat, caches = measured["full"], measured["concat"], measured["caches"]
    steps = full["steps"]
    table = Table(
        "expert_cache", f"python -m benchmarks.expert_cache run --windows {count}",
        ["engine", "experts resident / layer", "weight bytes resident", "max |Δ| vs torch", "max |Δ| vs model.onnx",
         "hit rate per layer (LRU, decode)", "Belady per layer", "loads", "decode ms/token", "vs full"],
    )
    table.rows.append(["full decode.onnx (every expert)", "16 of 16", full["weight_bytes"], full["max_diff_torch"],
                       full["max_diff_onnx"], "-", "-", 0, full["ms_per_token"], 1.0])
    table.rows.append(["full decode.onnx, concat KV (the cache's layout)", "16 of 16", full["weight_bytes"],
                       concat["max_diff_torch"], concat["max_diff_onnx"], "-", "-", 0, concat["ms_per_token"],
                       concat["ms_per_token"] / full["ms_per_token"]])
    for c in caches:
        table.rows.append([
            f"expert cache C = {c['slots']}", f"{c['slots']} of 16", c["bytes_resident"], c["max_diff_torch"],
            c["max_diff_onnx"], " / ".join(f"{l['lru_hit_rate_decode']:.3f}" for l in c["layers"]),
            " / ".join(f"{l['belady_hit_rate_decode']:.3f}" for l in c["layers"]), c["loads"], c["ms_per_token"],
            c["ms_per_token"] / full["ms_per_token"],
        ])
    table.notes += [
        f"Text: the first {ref['windows']} non-overlapping {WINDOW}-byte windows of held-out code; each window: prefill "
        f"{PREFILL} tokens, then {WINDOW - PREFILL} single-token steps ({steps} steps per engine); max |Δ| over every "
        f"position's logits. torch Program vs model.onnx: {ref['torch_vs_onnx']:.3g}.",
        f"Weight bytes: the full decode.onnx file; the expert cache's segment weights ({caches[0]['segment_bytes']:,} "
        f"bytes) + C slots per layer (segments + every expert: {caches[0]['bytes_full']:,} bytes); the store stays on disk "
        "(memory-mapped: the pages read sit in the OS page cache, reclaimable).",
        "Hit rate: requests are the k = 2 experts of each token per layer over the decode steps; the cache keeps its "
        "slots across windows; Belady is the best possible replacement with the future known (same per-token sets).",
        "The expert cache's segments use the concat KV layout (no in-place I/O binding) and run 5 segment + 4 experts "
        "sessions per token; decode.onnx is one session with GroupQueryAttention and a preallocated KV buffer.",
        f"CPU: {cpu_info()}; one thread; medians over all steps; the engines take turns window by window in one "
        "process (the machine was shared with other jobs: compare the ratios, not the absolute times).",
    ]
    table.raw = {"reference": ref, "full": full, "concat": concat, "caches": caches, "windows": count, "window": WINDOW,
                 "prefill": PREFILL}
    print(table.write().read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["compile", "concat", "run"])
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.what == "compile":
        compile_artifacts()
    elif args.what == "concat":
        concat_decode()
    else:
        run(args.windows)


if __name__ == "__main__":
    main()
