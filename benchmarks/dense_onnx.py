"""Dense reference LM: torch eager vs memc's ONNX artifacts (onnxruntime), side by side in one run.

    python -m benchmarks.dense_onnx [--model models/ref-llama] [--windows 8] [--repeats 5] [--decode-steps 32]

Prefill tokens/s at several context lengths, decode ms/token at the longest, peak RSS of each process, and
held-out perplexity of both (they must agree within 0.1%). Decode is measured two ways: *recompute* (one forward
over the whole prefix per token: memc's model.onnx has no KV state) and *KV state* (torch eager with its KV cache vs
memc's decode.onnx driven by memc.runtime.DecodeEngine: prefill context-1 tokens, then the median of single steps
from that state). The decode graph is verified against the original model (prefill + steps vs one forward) before
it is timed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Table, median_seconds, run_case

CONTEXTS = [128, 512, 1024]


def _heldout_windows(model: str, context: int, windows: int):
    """The first `windows` x `context` tokens of held-out code, read with the model's own tokenizer (or as bytes)."""
    from memc.reference import corpus, tokenizer

    ids = tokenizer.encode(corpus.held_out_bytes("code"), tokenizer.load_tokenizer(model))
    return ids[: windows * context].reshape(windows, context)


def _ppl(forward, ids) -> float:
    import math

    from memc.eval.perplexity import log_softmax_nll

    total = sum(float(log_softmax_nll(forward(w[None])[:, :-1], w[None, 1:]).sum()) for w in ids)
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


def torch_case(model: str, contexts: list[int], heldout, repeats: int, decode_steps: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True).eval()
    rng = np.random.default_rng(0)
    out: dict = {"prefill_tok_s": {}, "decode_ms": {}}

    def fwd(ids):
        with torch.no_grad():
            return m(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()

    for ctx in contexts:
        ids = rng.integers(0, 256, size=(1, ctx), dtype=np.int64)
        out["prefill_tok_s"][ctx] = ctx / median_seconds(lambda: fwd(ids), repeats)
    ctx = contexts[-1]
    ids = torch.from_numpy(rng.integers(0, 256, size=(1, ctx), dtype=np.int64))
    with torch.no_grad():
        past = m(input_ids=ids[:, :-1], use_cache=True).cache
        import copy

        def step():
            with torch.no_grad():
                m(input_ids=ids[:, -1:], cache=copy.deepcopy(past), use_cache=True)

        # each step starts from a copy of the context-1 cache (a step appends to it); the copy time is subtracted
        copy_s = median_seconds(lambda: copy.deepcopy(past), decode_steps)
        out["decode_ms"]["kv-cache"] = (median_seconds(step, decode_steps) - copy_s) * 1e3
    out["decode_ms"]["recompute"] = median_seconds(lambda: fwd(ids.numpy()), repeats) * 1e3
    out["perplexity"] = _ppl(fwd, heldout)
    return out


def onnx_case(artifact: str, contexts: list[int], heldout, repeats: int) -> dict:
    import numpy as np

    from memc.targets.session import create_session

    sess = create_session(Path(artifact) / "model.onnx", threads=1)
    rng = np.random.default_rng(0)
    out: dict = {"prefill_tok_s": {}, "decode_ms": {}}

    def fwd(ids):
        return sess.run(None, {"input_ids": ids})[0]

    for ctx in contexts:
        ids = rng.integers(0, 256, size=(1, ctx), dtype=np.int64)
        out["prefill_tok_s"][ctx] = ctx / median_seconds(lambda: fwd(ids), repeats)
    ids = rng.integers(0, 256, size=(1, contexts[-1]), dtype=np.int64)
    out["decode_ms"]["recompute"] = median_seconds(lambda: fwd(ids), repeats) * 1e3
    out["perplexity"] = _ppl(fwd, heldout)
    out["artifact_bytes"] = (Path(artifact) / "model.onnx").stat().st_size
    return out


def decode_build_case(model: str, out_dir: str) -> dict:
    """Write decode.onnx for ``model`` and verify it: prefill + single steps == one forward of the original."""
    import time

    import numpy as np
    import torch

    from memc.codegen.decode import build_decode_artifact, verify_decode
    from memc.config import load_config

    torch.set_num_threads(1)
    t = time.perf_counter()
    path = build_decode_artifact(model, out_dir, load_config("toolchain.toml").target.opset)  # as model.onnx
    seconds = time.perf_counter() - t
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 64), dtype=np.int64)
    check = verify_decode(path, model, ids, prefill=32)
    if not check.passed:
        raise RuntimeError(f"decode graph does not match the original model: {check.as_dict()}")
    return {"path": str(path), "build_s": seconds, "bytes": path.stat().st_size, "check": check.as_dict()}


def decode_case(artifact: str, contexts: list[int], decode_steps: int) -> dict:
    """memc's decode engine (onnxruntime, 1 thread): prefill context - steps tokens, then time ``decode_steps``
    single steps in sequence (as generation runs them: each extends the cache in place), the last at context - 1."""
    import time

    import numpy as np

    from memc.runtime.engine import DecodeEngine

    engine = DecodeEngine(artifact, threads=1)
    ctx = contexts[-1]
    ids = np.random.default_rng(0).integers(0, 256, size=(1, ctx), dtype=np.int64)
    _, state = engine.prefill(ids[:, :ctx - decode_steps])
    times = []
    for t in range(ctx - decode_steps, ctx):
        start = time.perf_counter()
        _, state = engine.step(ids[:, t], state)
        times.append(time.perf_counter() - start)
    return {"decode_ms": {"kv-state": float(np.median(times)) * 1e3}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 1024 tokens for perplexity")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=32, help="timed single decode steps (median) per KV case")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "onnx"
        subprocess.run(
            [sys.executable, "-m", "memc", "compile", args.model, "-c", "toolchain.toml", "-o", str(artifact), "--no-progress"],
            check=True, stdout=subprocess.DEVNULL,
        )
        decode_built = run_case("benchmarks.dense_onnx:decode_build_case", model=args.model, out_dir=str(artifact))
        # tokenised here, so neither case pays the tokenizer's imports (transformers, torch) in its peak RSS
        common = {"contexts": CONTEXTS, "heldout": _heldout_windows(args.model, 1024, args.windows),
                  "repeats": args.repeats}
        eager = run_case("benchmarks.dense_onnx:torch_case", model=args.model, decode_steps=args.decode_steps, **common)
        ort = run_case("benchmarks.dense_onnx:onnx_case", artifact=str(artifact), **common)
        dec = run_case("benchmarks.dense_onnx:decode_case", artifact=decode_built["path"], contexts=CONTEXTS,
                       decode_steps=args.decode_steps)

    cmd = "python -m benchmarks.dense_onnx " + " ".join(argv if argv is not None else sys.argv[1:])
    t = Table("dense_onnx", cmd.strip(), ["metric", "torch eager", "memc onnx (onnxruntime)", "memc speed-up (>1: memc faster / smaller)"])
    for ctx in CONTEXTS:
        a, b = eager["prefill_tok_s"][ctx], ort["prefill_tok_s"][ctx]
        t.rows.append([f"prefill tokens/s @ {ctx}", a, b, f"{b / a:.2f}x"])  # throughput ratio
    last = CONTEXTS[-1]
    a, b = eager["decode_ms"]["recompute"], ort["decode_ms"]["recompute"]
    t.rows.append([f"decode ms/token @ {last} (recompute)", a, b, f"{a / b:.2f}x"])
    a, b = eager["decode_ms"]["kv-cache"], dec["decode_ms"]["kv-state"]
    t.rows.append([f"decode ms/token @ {last} (KV state)", a, b, f"{a / b:.2f}x"])
    t.rows.append(["peak RSS MB", eager["peak_rss_mb"], ort["peak_rss_mb"], f"{eager['peak_rss_mb'] / ort['peak_rss_mb']:.2f}x"])
    rel = abs(ort["perplexity"] - eager["perplexity"]) / eager["perplexity"]
    t.rows.append([f"held-out code perplexity per token ({args.windows}x1024 tokens)", eager["perplexity"], ort["perplexity"], f"rel. diff {rel:.1e}"])
    t.notes.append("One thread each, every case in a fresh process; medians of "
                   f"{args.repeats} runs after a warm-up. Peak RSS includes each runtime's own import cost.")
    t.notes.append(f"KV state: torch eager with its DynamicCache (median of {args.decode_steps} single steps after a "
                   f"{last - 1}-token prefill) vs memc decode.onnx (DecodeEngine: median of {args.decode_steps} steps "
                   f"in sequence after a {last - args.decode_steps}-token prefill); the decode graph matched the "
                   f"original within max |Δ| {decode_built['check']['max_abs_diff']:.2g} (prefill 32 + 32 steps).")
    t.raw = {"torch": eager, "onnx": ort, "decode": {**dec, "build": decode_built}}
    path = t.write()
    print(t.markdown())
    print(f"wrote {path}")
    _plot(eager, ort)


def _plot(eager: dict, ort: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.harness import RESULTS

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, res in (("torch eager", eager), ("memc onnx", ort)):
        xs = sorted(int(k) for k in res["prefill_tok_s"])
        ax.plot(xs, [res["prefill_tok_s"][k] for k in xs], marker="o", label=label)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("prefill tokens/s (1 thread)")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "dense_onnx.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
