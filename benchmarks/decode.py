"""Decode on ref-llama: torch eager (KV cache) vs memc's KV decode.onnx vs memc's memory-caching decode, plus
onnxruntime-genai peers built from the same weights, engines taking turns in one process.

    python -m benchmarks.decode [--model models/ref-llama] [--steps 32] [--rounds 4] [--slice 4]
                                [--contexts 1024,8192,32768] [--no-peers] [--engines memc-kv,memc-mc,genai-fp32,...]

Per engine: prefill tokens/s of a 990-token held-out prompt (``--rounds`` prefills in turns), decode ms/token and
CPU ms/token (medians of ``--steps`` greedy steps after it, ``--slice`` steps at a time in turns with the other
engines, no engine's slice right after its own: turn_orders), the state's bytes, bytes on disk
and greedy agreement with torch over those steps. At each longer context the engines that can reach it step from a
synthesised state of that length: random KV caches for torch / memc KV (positions beyond the trained 1024 are
fine for speed and state size, never for quality); for memory caching the prefilled state with its counters set
to that context (tokens seen; for the gated layout also the open segment's fill and every cached-segment slot
full), so each step does the work of a step at that context. memc's KV graph lowers attention to
GroupQueryAttention over a preallocated buffer updated in place (memc.codegen.attention); the memory-caching graph
is toolchains/memory-caching.toml's select pipeline with its committed layers (toolchains/memory-caching-pretrained
.toml: the same weights without distilling again; decode graph on, a pool of 256 tokens: a constant state). memc's
sessions flush denormals on the calling thread during their runs (memc.targets.float_env); the peers run as their
tools set them up. One thread everywhere.

Peers (``pip install memc[peers]``): onnxruntime-genai's model builder (fp32, int4) on a temporary copy of the
model directory (the builder needs an eos_token_id in config.json and imports onnx_ir). llama.cpp is listed as not
installed unless llama_cpp imports.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.decode_engines import Genai, GenaiFlushed, Memc, TorchEager
from benchmarks.harness import Table, cpu_info, run_case

PROMPT = 990
CONTEXTS = [1024, 8192, 32768]
# torch eager always runs: it is the reference; genai-fp32-ftz is genai's fp32 model run with denormals flushed
# (memc's session setting, memc.targets.float_env), to show how much of a difference is that setting
ENGINES = ["memc-kv", "memc-mc", "genai-fp32", "genai-fp32-ftz", "genai-int4"]


def _prompt(model: str) -> Any:
    from memc.reference import corpus, tokenizer

    ids = tokenizer.encode(corpus.held_out_bytes("code"), tokenizer.load_tokenizer(model))
    return ids[None, :PROMPT].astype("int64")


def _greedy_run(engine, prompt, steps: int, per: int):
    """``steps`` greedy steps after ``prompt`` in slices of ``per``: yields (step times, new tokens, state, CPU
    times) after each slice, so the caller lets the engines take turns."""
    import numpy as np

    logits, state = engine.prefill(prompt)
    tokens, times, cpu = [], [], []
    for i in range(steps):
        token = np.array([int(logits[0].argmax())], np.int64) if logits is not None else None
        if token is not None:
            tokens.append(int(token[0]))
        t, c = time.perf_counter(), time.process_time()
        logits, state = engine.step(token, state)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if (i + 1) % per == 0 or i + 1 == steps:
            yield times, tokens, state, cpu


def turn_orders(keys: list[str], turns: int, order: str = "alternate") -> list[list[str]]:
    """The engines' order in each turn: ``keys`` and, every other turn, ``keys[1], keys[0], keys[-1], ..., keys[2]``
    (``order="reversed"``: ``keys`` reversed every other turn, this benchmark's schedule before, kept to compare).

    A slice's first step pays for the caches the previous slice's engine left (torch eager's steps write a new
    KV cache each time, evicting the most). Reversing the order every turn, as this benchmark did before, gives the
    engines at the ends back-to-back slices (the second one warm) and the middle one none: on the AVX-512 machine
    that alone made memc, listed in the middle, 1.14x genai, and 1.01x with the two swapped. Here every engine's
    predecessor is another engine in every turn; with three engines each follows each of the other two half the
    time (with two, each always follows the other).
    """
    if order == "reversed":
        return [list(keys) if turn % 2 == 0 else list(keys)[::-1] for turn in range(turns)]
    if order != "alternate":
        raise ValueError(f"order must be alternate | reversed, got {order!r}")
    if len(keys) < 3:
        return [list(keys)] * turns
    back = [keys[1], keys[0], *keys[:1:-1]]
    return [list(keys) if turn % 2 == 0 else back for turn in range(turns)]


def turns_case(model: str, kv: str | None, mc: str | None, segment: int, peers: dict, steps: int, rounds: int,
               contexts: list[int], slice_steps: int = 4, order: str = "alternate", repeats: int = 1,
               wanted: tuple[str, ...] = ()) -> dict:
    import statistics

    import numpy as np
    import torch

    torch.set_num_threads(1)
    prompt = _prompt(model)
    engines: dict[str, Any] = {"torch": TorchEager(model)}
    if kv:
        engines["memc-kv"] = Memc(kv, "memc decode.onnx fp32 (KV, DecodeEngine)")
    if mc:
        engines["memc-mc"] = Memc(mc, "memc memory-caching decode.onnx fp32 (select, pool 256)", segment)
    for key, path in peers.items():
        engines[key] = Genai(path, f"onnxruntime-genai {key.split('-', 1)[1]} (model builder)")
        if key == "genai-fp32" and "genai-fp32-ftz" in wanted:
            engines["genai-fp32-ftz"] = GenaiFlushed(path, "onnxruntime-genai fp32, denormals flushed (as memc)")
    out: dict = {k: {"name": e.name, "disk_bytes": e.disk, "prefill_s": [], "decode_ms": {}, "state_bytes": {}}
                 for k, e in engines.items()}
    # prefill, in turns
    for _ in range(rounds):
        for key, e in engines.items():
            t = time.perf_counter()
            e.prefill(prompt)
            out[key]["prefill_s"].append(time.perf_counter() - t)
    # greedy steps after the prompt (~1k context), slices in turns whose order alternates so that no engine follows
    # itself and, with three, each follows each other one equally often (turn_orders); each repeat prefills again
    # and rotates the engines' order, so every engine takes every place in a turn
    times_of: dict = {k: [] for k in engines}
    cpu_of: dict = {k: [] for k in engines}
    for rep in range(repeats):
        keys = list(engines)[rep % len(engines):] + list(engines)[: rep % len(engines)]
        runs = {k: _greedy_run(engines[k], prompt, steps, slice_steps) for k in keys}
        last: dict = {}
        for turn in turn_orders(keys, -(-steps // slice_steps), order):
            for key in turn:
                last[key] = next(runs[key])
        for key in keys:
            times_of[key] += last[key][0]
            cpu_of[key] += last[key][3]
        if rep == 0:
            first = dict(last)
    ref_tokens = first["torch"][1]
    for key, e in engines.items():
        _, tokens, state, _ = first[key]
        times, cpu = times_of[key], cpu_of[key]
        if isinstance(e, Genai):
            tokens = e.tokens(state, prompt.shape[1])
        out[key]["decode_ms"][str(PROMPT)] = statistics.median(times) * 1e3
        out[key]["decode_steps"] = len(times)
        out[key]["decode_cpu_ms"] = statistics.mean(cpu) * 1e3  # process CPU time: what the step costs, unqueued
        out[key]["decode_cpu_median_ms"] = statistics.median(cpu) * 1e3
        out[key]["state_bytes"][str(PROMPT + steps)] = e.state_bytes(state)
        out[key]["greedy_equal"] = int(sum(a == b for a, b in zip(tokens, ref_tokens)))
        out[key]["greedy_of"] = len(ref_tokens)
        if key == "memc-mc":
            prefilled = state
    # longer contexts from synthesised states (engines that reach them)
    long_steps = max(rounds, steps // 2)
    for ctx in contexts:
        if ctx <= max(PROMPT + steps, 1024):  # the ~1k point is the greedy run after the prompt
            continue
        states = {}
        for key, e in engines.items():
            if isinstance(e, Genai):
                continue
            states[key] = e.synth(ctx - 1, prefilled if key == "memc-mc" else None)
            _, states[key] = e.step(np.array([1], np.int64), states[key])  # warm-up (memc copies into its buffer)
        times = {k: [] for k in states}
        for i in range(long_steps):
            for key in states:
                t = time.perf_counter()
                _, states[key] = engines[key].step(np.array([(7 * i) % 256], np.int64), states[key])
                times[key].append(time.perf_counter() - t)
        for key in states:
            out[key]["decode_ms"][str(ctx)] = statistics.median(times[key]) * 1e3
            out[key]["state_bytes"][str(ctx)] = engines[key].state_bytes(states[key])
        del states
    for key in out:
        out[key]["prefill_tok_s"] = PROMPT / statistics.median(out[key].pop("prefill_s"))
    out["versions"] = _versions()
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "llama-cpp-python"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def _compile(model: str, out: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "memc", "compile", model, "-o", str(out), "--no-progress", *args],
                   check=True, stdout=subprocess.DEVNULL)


def _build_genai(model: str, tmp: Path, precisions: tuple[str, ...] = ("fp32", "int4")) -> dict[str, str]:
    """onnxruntime-genai models (fp32 / int4) from a copy of the model directory (with the eos_token_id its builder
    wants)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return {}
    src = tmp / "genai-src"
    shutil.copytree(model, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["eos_token_id"] = cfg.get("eos_token_id") or 0
    cfg["bos_token_id"] = cfg.get("bos_token_id") or 0
    (src / "config.json").write_text(json.dumps(cfg))
    built = {}
    for precision in precisions:
        out = tmp / f"genai-{precision}"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(tmp / "genai-cache")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gcfg = json.loads((out / "genai_config.json").read_text())
        gcfg["model"]["decoder"]["session_options"].update(intra_op_num_threads=1, inter_op_num_threads=1)
        (out / "genai_config.json").write_text(json.dumps(gcfg, indent=2))
        built[f"genai-{precision}"] = str(out)
    return built


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--steps", type=int, default=32, help="greedy steps timed after the prompt (median)")
    ap.add_argument("--rounds", type=int, default=4, help="turns: prefills per engine, and slices of the steps")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--no-peers", action="store_true", help="skip building onnxruntime-genai models")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"engines besides torch eager (the reference), comma-separated from {','.join(ENGINES)}")
    ap.add_argument("--slice", type=int, default=4, help="greedy steps per engine per turn")
    ap.add_argument("--repeats", type=int, default=1,
                    help="greedy runs after the prompt (each a fresh prefill, the engines' order rotated); decode "
                         "medians pool every run's steps (genai's 1024-token context allows ~32 steps per run)")
    ap.add_argument("--order", choices=["alternate", "reversed"], default="alternate",
                    help="engines' order per turn (turn_orders); reversed: the earlier schedule, to compare")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(chosen) - set(ENGINES))
    if unknown:
        ap.error(f"--engines: unknown {', '.join(unknown)} (choose from {', '.join(ENGINES)})")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        t = time.perf_counter()
        kv = mc = None
        segment = 0
        if "memc-kv" in chosen:
            kv = tmp / "kv"
            _compile(args.model, kv, "-c", "toolchain.toml", "--set", "target.decode_graph=true")
        if "memc-mc" in chosen:
            mc = tmp / "mc"
            _compile(args.model, mc, "-c", "toolchains/memory-caching-pretrained.toml")  # the shipped select layers
            segment = next(p["options"]["segment"] for p in json.loads((mc / "report.json").read_text())["passes"]
                           if p["name"] == "memory-caching")
        precisions = tuple(dict.fromkeys(e.split("-")[1] for e in chosen if e.startswith("genai-")))
        peers = {} if args.no_peers or not precisions else _build_genai(args.model, tmp, precisions)
        build_s = time.perf_counter() - t
        res = run_case("benchmarks.decode:turns_case", model=args.model, kv=str(kv) if kv else None,
                       mc=str(mc) if mc else None, segment=segment, peers=peers, steps=args.steps,
                       rounds=args.rounds, contexts=contexts, slice_steps=args.slice, order=args.order,
                       repeats=args.repeats, wanted=tuple(chosen))
        reports = {k: json.loads((d / "report.json").read_text())["verification"] for k, d in
                   (("KV", kv), ("memory caching", mc)) if d is not None}

    versions = res.pop("versions")
    cmd = "python -m benchmarks.decode " + " ".join(argv if argv is not None else sys.argv[1:])
    longer = [c for c in contexts if c > max(PROMPT + args.steps, 1024)]
    cols = ["engine", "bytes on disk", f"prefill tok/s ({PROMPT})", f"decode CPU ms/token @{PROMPT} (median)"]
    cols += [f"decode ms/token @{c}" for c in [PROMPT, *longer]]
    cols += [f"state @{c}" for c in [PROMPT + args.steps, *longer]]
    cols += [f"greedy = torch (of {args.steps})"]
    t = Table("decode", cmd.strip(), cols)
    keys = [k for k in ("torch", "memc-kv", "memc-mc", "genai-fp32", "genai-fp32-ftz", "genai-int4") if k in res]
    for key in keys:
        r = res[key]
        row = [r["name"], _mb(r["disk_bytes"]), r["prefill_tok_s"], r["decode_cpu_median_ms"]]
        row += [r["decode_ms"].get(str(c), "n/a") for c in cols_ctx(cols)]
        row += [_mb(r["state_bytes"][str(c)]) if str(c) in r["state_bytes"] else "n/a" for c in state_ctx(cols)]
        row.append(r["greedy_equal"])
        t.rows.append(row)
    if precisions and not any(k.startswith("genai-") for k in res):
        t.rows.append(["onnxruntime-genai", "not installed", *["n/a"] * (len(cols) - 2)])
    t.rows.append(["llama.cpp (llama-cpp-python)", versions["llama-cpp-python"], *["n/a"] * (len(cols) - 2)])
    kv_ms = res["memc-kv"]["decode_ms"] if "memc-kv" in res else {}
    mc_ms = res["memc-mc"]["decode_ms"] if "memc-mc" in res else {}
    longest = str(max(contexts))
    ratios = []
    growth = [f"{label}: {ms[longest] / ms[str(PROMPT)]:.2f}x" for label, ms in
              (("memory caching (bar: <= 1.5x)", mc_ms), ("KV decode.onnx", kv_ms),
               ("torch eager", res["torch"]["decode_ms"])) if longest in ms]
    if growth:
        ratios.append(f"decode @{longest} / @{PROMPT}: " + "; ".join(growth))
    if "genai-fp32" in res and kv_ms:
        g = res["genai-fp32"]
        ratios.append(f"memc KV / genai fp32 decode ms/token @{PROMPT}: {kv_ms[str(PROMPT)] / g['decode_ms'][str(PROMPT)]:.2f}x, "
                      f"CPU ms/token {res['memc-kv']['decode_cpu_median_ms'] / g['decode_cpu_median_ms']:.2f}x "
                      f"(bar: <= 1); memc KV / torch eager prefill tok/s: "
                      f"{res['memc-kv']['prefill_tok_s'] / res['torch']['prefill_tok_s']:.2f}x (bar: >= 1)")
    if "genai-fp32-ftz" in res and kv_ms:
        g = res["genai-fp32-ftz"]
        ratios.append(f"memc KV / genai fp32 with denormals flushed too: "
                      f"{kv_ms[str(PROMPT)] / g['decode_ms'][str(PROMPT)]:.2f}x decode ms/token @{PROMPT}, CPU "
                      f"{res['memc-kv']['decode_cpu_median_ms'] / g['decode_cpu_median_ms']:.2f}x (the graphs alone)")
    t.notes += ratios
    t.notes.append(
        f"CPU: {cpu_info()}; one thread per engine; versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    schedule = ("no engine following itself: benchmarks.decode.turn_orders" if args.order == "alternate"
                else "the order reversed every turn")
    t.notes.append(
        f"Prompt: {PROMPT} held-out code tokens; prefill tok/s is the median of {args.rounds} prefills per engine in "
        f"turns; decode ms/token @{PROMPT} the median of {args.steps} greedy steps after it"
        + (f", in each of {args.repeats} runs (a fresh prefill each, the engines' order rotated; "
           f"{args.repeats * args.steps} steps per engine pooled; greedy agreement from the first run)"
           if args.repeats > 1 else "")
        + f" (slices of {args.slice} steps in turns, {schedule}), CPU ms/token the median process CPU time of those steps "
        "(wall times on this shared, oversubscribed machine include waiting for a core; CPU time is the work). "
        "Longer contexts: synthesised states (see the module docstring), median of "
        f"{max(args.rounds, args.steps // 2)} steps in turns; genai's context_length is the model's 1024. The memory-"
        "caching engine feeds a prompt token by token (its graph is single-token), and it is a different model "
        "(distilled memory-caching layers), so its greedy agreement with torch is a quality figure, not a bug.")
    checks = "; ".join(
        f"{label} max |Δ| {r['max_abs_diff'].get('decode.logits', float('nan')):.2g}, greedy "
        f"{r.get('decode', {}).get('greedy', {}).get('equal')}" for label, r in reports.items())
    t.notes.append(
        f"memc decode graphs verified at compile (prefill + single steps vs the Program's full-sequence logits): "
        f"{checks or 'none built'}. Build and peer set-up {build_s:.0f} s.")
    t.raw = {**res, "versions": versions}
    path = t.write()
    print(t.markdown())
    print(f"wrote {path}")
    print(f"wrote {plot(t.raw)}")


def plot(raw: dict) -> Path:
    """benchmarks/results/decode.png from a run's raw results (decode.json's ``raw``): decode ms/token and state
    bytes against the context, one line per engine (genai only at ~1k: its context is the model's 1024)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.harness import RESULTS

    fig, (speed, state) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, r in raw.items():
        if not isinstance(r, dict) or "decode_ms" not in r:
            continue
        xs = sorted(int(c) for c in r["decode_ms"])
        style = dict(marker="o", label=r["name"], linestyle="-" if len(xs) > 1 else "none")
        speed.plot(xs, [r["decode_ms"][str(c)] for c in xs], **style)
        ys = sorted(int(c) for c in r["state_bytes"])
        state.plot(ys, [r["state_bytes"][str(c)] / 1e6 for c in ys], **style)
    for ax, label in ((speed, "decode ms/token (1 thread, median)"), (state, "state MB (batch 1, fp32)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    speed.legend(fontsize=6)
    fig.tight_layout()
    out = RESULTS / "decode.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cols_ctx(cols: list[str]) -> list[int]:
    return [int(c.split("@")[1]) for c in cols if c.startswith("decode ms/token @")]


def state_ctx(cols: list[str]) -> list[int]:
    return [int(c.split("@")[1]) for c in cols if c.startswith("state @")]


if __name__ == "__main__":
    main()
