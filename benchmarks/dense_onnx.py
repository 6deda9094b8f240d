"""Dense reference LM: torch eager vs memc's ONNX artifact (onnxruntime), side by side in one run.

    python -m benchmarks.dense_onnx [--model models/ref-llama] [--windows 8] [--repeats 5]

Prefill tokens/s at several context lengths, decode ms/token at the longest, peak RSS of each process, and
held-out perplexity of both (they must agree within 0.1%). The memc artifact has no KV state in its graph, so
its decode is recompute decode; torch eager is shown both with its KV cache and in the same recompute mode.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Table, median_time, run_case

CONTEXTS = [128, 512, 1024]


def _heldout_windows(context: int, windows: int):
    import numpy as np

    from memc.reference import corpus

    data = np.frombuffer(corpus.held_out_bytes("code"), dtype=np.uint8).astype(np.int64)
    return data[: windows * context].reshape(windows, context)


def _ppl(forward, ids) -> float:
    import math

    from memc.eval.perplexity import log_softmax_nll

    total = sum(float(log_softmax_nll(forward(w[None])[:, :-1], w[None, 1:]).sum()) for w in ids)
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


def torch_case(model: str, contexts: list[int], windows: int, repeats: int) -> dict:
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
        out["prefill_tok_s"][ctx] = ctx / median_time(lambda: fwd(ids), repeats)
    ctx = contexts[-1]
    ids = torch.from_numpy(rng.integers(0, 256, size=(1, ctx), dtype=np.int64))
    with torch.no_grad():
        past = m(input_ids=ids[:, :-1], use_cache=True).past_key_values
        import copy

        def step():
            with torch.no_grad():
                m(input_ids=ids[:, -1:], past_key_values=copy.deepcopy(past), use_cache=True)

        copy_s = median_time(lambda: copy.deepcopy(past), repeats)
        out["decode_ms"]["kv-cache"] = (median_time(step, repeats) - copy_s) * 1e3
    out["decode_ms"]["recompute"] = median_time(lambda: fwd(ids.numpy()), repeats) * 1e3
    out["perplexity"] = _ppl(fwd, _heldout_windows(1024, windows))
    return out


def onnx_case(artifact: str, contexts: list[int], windows: int, repeats: int) -> dict:
    import numpy as np

    from memc.targets.session import create_session

    sess = create_session(Path(artifact) / "model.onnx", threads=1)
    rng = np.random.default_rng(0)
    out: dict = {"prefill_tok_s": {}, "decode_ms": {}}

    def fwd(ids):
        return sess.run(None, {"input_ids": ids})[0]

    for ctx in contexts:
        ids = rng.integers(0, 256, size=(1, ctx), dtype=np.int64)
        out["prefill_tok_s"][ctx] = ctx / median_time(lambda: fwd(ids), repeats)
    ids = rng.integers(0, 256, size=(1, contexts[-1]), dtype=np.int64)
    out["decode_ms"]["recompute"] = median_time(lambda: fwd(ids), repeats) * 1e3
    out["perplexity"] = _ppl(fwd, _heldout_windows(1024, windows))
    out["artifact_bytes"] = (Path(artifact) / "model.onnx").stat().st_size
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 1024 bytes for perplexity")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "onnx"
        subprocess.run(
            [sys.executable, "-m", "memc", "compile", args.model, "-c", "toolchain.toml", "-o", str(artifact), "--no-progress"],
            check=True, stdout=subprocess.DEVNULL,
        )
        common = {"contexts": CONTEXTS, "windows": args.windows, "repeats": args.repeats}
        eager = run_case("benchmarks.dense_onnx:torch_case", model=args.model, **common)
        ort = run_case("benchmarks.dense_onnx:onnx_case", artifact=str(artifact), **common)

    cmd = "python -m benchmarks.dense_onnx " + " ".join(argv if argv is not None else sys.argv[1:])
    t = Table("dense_onnx", cmd.strip(), ["metric", "torch eager", "memc onnx (onnxruntime)", "memc / torch"])
    for ctx in CONTEXTS:
        a, b = eager["prefill_tok_s"][ctx], ort["prefill_tok_s"][ctx]
        t.rows.append([f"prefill tokens/s @ {ctx}", a, b, f"{b / a:.2f}x"])
    last = CONTEXTS[-1]
    a, b = eager["decode_ms"]["recompute"], ort["decode_ms"]["recompute"]
    t.rows.append([f"decode ms/token @ {last} (recompute)", a, b, f"{a / b:.2f}x faster"])
    t.rows.append([f"decode ms/token @ {last} (torch KV cache)", eager["decode_ms"]["kv-cache"], "n/a (no state I/O yet)", ""])
    t.rows.append(["peak RSS MB", eager["peak_rss_mb"], ort["peak_rss_mb"], f"{ort['peak_rss_mb'] / eager['peak_rss_mb']:.2f}x"])
    rel = abs(ort["perplexity"] - eager["perplexity"]) / eager["perplexity"]
    t.rows.append([f"held-out code perplexity ({args.windows}x1024 B)", eager["perplexity"], ort["perplexity"], f"rel. diff {rel:.1e}"])
    t.notes.append("One thread each, every case in a fresh process; medians of "
                   f"{args.repeats} runs after a warm-up. Peak RSS includes each runtime's own import cost.")
    t.raw = {"torch": eager, "onnx": ort}
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
