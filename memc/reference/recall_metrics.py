"""Metrics of the recall model next to ref-llama: ``python -m memc.reference.recall_metrics models/ref-llama-recall``.

Recall is `memc eval --recall`'s own probe on its own backend (held-out code filler, the model's tokenizer,
seed 0); bits/byte are computed window by window on exactly the windows `memc eval` scores (the whole held-out
code, non-overlapping windows of 1024 tokens, each scored from its own start) for both models, so their
difference comes with its paired standard error. Writes metrics.json.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from memc.atomic import write_json
from memc.eval.backends import load_backend
from memc.eval.recall import recall_probe
from memc.eval.text import load_text, text_codec
from memc.reference import metrics, tokenizer
from memc.reference.models import CONTEXT

BASE = Path(__file__).resolve().parents[2] / "models" / "ref-llama"
DISTANCES = (16, 64, 128, 256, 512, 640, 896)
TRIALS = 64


def window_bits(path: Path, tokens: np.ndarray, context: int = CONTEXT, batch: int = 8, stride: int = 1) -> np.ndarray:
    """Per window: summed bits of tokens 1..context-1 given the window's earlier tokens (float32), on the
    windows `memc eval` scores (tokens[:n*context] cut into n non-overlapping windows), every `stride`-th."""
    model = metrics.load(path)
    n = len(tokens) // context
    windows = torch.from_numpy(tokens[: n * context].reshape(n, context)[::stride].copy())
    n = len(windows)
    bits = []
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = windows[i : i + batch]
            logits = model(input_ids=x[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1)
            bits.append(nll.numpy() / math.log(2))
    return np.concatenate(bits)


def cached_window_bits(
    path: Path, tokens: np.ndarray, context: int, cache: Path | None, stride: int = 1
) -> np.ndarray:
    """window_bits, read from / written to cache/<model dir name>.npy when a cache directory is given."""
    f = None if cache is None else cache / f"{Path(path).resolve().name}.npy"
    if f is not None and f.is_file():
        bits = np.load(f)
        if len(bits) == len(tokens) // context:  # all windows: take the stride's
            return bits[::stride]
        if len(bits) == len(range(0, len(tokens) // context, stride)):
            return bits
    bits = window_bits(path, tokens, context, stride=stride)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, bits)
    return bits


def paired_bits_per_byte(
    path: Path, base: Path, context: int = CONTEXT, bits_cache: Path | None = None, text: str = "heldout:code",
    stride: int = 1,
) -> dict:
    """Bits/byte of both models on the same windows of `text` (a `memc eval --text` spec; every `stride`-th
    window, an unselected sample, when stride > 1), their difference and its paired SE. `bits_cache`: a
    directory of per-window bits by model (reused when present)."""
    tok = tokenizer.load_tokenizer(base)
    tokens = tokenizer.encode(load_text(text), tok)
    n_all = len(tokens) // context
    window_bytes = tokenizer.byte_lengths(tok)[tokens[: n_all * context].reshape(n_all, context)[::stride, 1:]].sum(1)
    a, b = (cached_window_bits(p, tokens, context, bits_cache, stride) for p in (path, base))
    n, total = len(a), float(window_bytes.sum())
    return {
        "text": text, "context": context, "windows": n, "of_windows": n_all, "stride": stride,
        "scored_bytes": int(total),
        "bits_per_byte": round(float(a.sum()) / total, 4), "base_bits_per_byte": round(float(b.sum()) / total, 4),
        "delta_bits_per_byte": round(float((a - b).sum()) / total, 4),
        "delta_paired_se": round(float(np.std(a - b, ddof=1) * math.sqrt(n)) / total, 4),
    }


def recall_table(path: Path, distances, trials: int, seed: int = 0) -> list[dict]:
    """What `memc eval PATH --recall` reports: the same backend, filler (held-out code), codec and seed."""
    backend = load_backend(str(path))
    points = recall_probe(backend, load_text("heldout:code"), list(distances), CONTEXT, trials, seed,
                          encode=text_codec(backend.info).encode)
    return [p.as_dict() for p in points]


def measure(path: Path, base: Path = BASE, distances=DISTANCES, trials: int = TRIALS, base_trials: int = 16,
            bits_cache: Path | None = None, stride: int = 1) -> dict:
    base_points = recall_table(base, distances, base_trials) if base_trials else None
    heldout = paired_bits_per_byte(path, base, bits_cache=bits_cache, stride=stride)
    return assemble(path, recall_table(path, distances, trials), heldout, base_points)


def assemble(path: Path, recall: list[dict], heldout_code: dict, base_recall: list[dict] | None = None) -> dict:
    """metrics.json from its parts (recall points in distance order)."""
    distances = ",".join(str(p["distance"]) for p in recall)
    result = {
        "recall_command": f"memc eval {path} --recall --recall-distances {distances} "
                          f"--recall-trials {recall[0]['trials']}",
        "recall": recall, "min_token_accuracy": min(p["token_accuracy"] for p in recall), "heldout_code": heldout_code,
    }
    if base_recall:
        result["base_recall"] = {"model": "models/ref-llama", "trials": base_recall[0]["trials"], "points": base_recall}
    return result


def print_table(result: dict, console: Console) -> None:
    base = result.get("base_recall")
    t = Table(title="recall (teacher-forced value tokens, held-out code filler"
                    + (f"; ref-llama: {base['trials']} trials)" if base else ")"))
    cols = ["distance", "trials", "recall model", "exact", "control"]
    cols += ["ref-llama", "ref-llama control"] if base else []
    for col in cols:
        t.add_column(col, justify="right")
    for i, p in enumerate(result["recall"]):
        row = [str(p["distance"]), str(p["trials"]), f"{p['token_accuracy']:.3f}", f"{p['exact']:.3f}",
               f"{p['control_token_accuracy']:.3f}"]
        if base:
            q = base["points"][i]
            row += [f"{q['token_accuracy']:.3f}", f"{q['control_token_accuracy']:.3f}"]
        t.add_row(*row)
    console.print(t)
    b = result["heldout_code"]
    console.print(f"held-out code bits/byte ({b['windows']} of {b['of_windows']} windows of {b['context']}): "
                  f"recall model "
                  f"{b['bits_per_byte']:.4f}, ref-llama {b['base_bits_per_byte']:.4f}, "
                  f"delta {b['delta_bits_per_byte']:+.4f} (paired SE {b['delta_paired_se']:.4f})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--base", type=Path, default=BASE)
    p.add_argument("--trials", type=int, default=TRIALS)
    p.add_argument("--distances", default=",".join(map(str, DISTANCES)))
    p.add_argument("--base-trials", type=int, default=16, help="recall trials for the base model (0: skip)")
    p.add_argument("--bits-cache", type=Path, help="directory caching each model's per-window held-out bits")
    p.add_argument("--stride", type=int, default=1, help="score every STRIDE-th held-out window (default: all)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    distances = [int(d) for d in a.distances.split(",")]
    result = measure(a.path, a.base, distances, a.trials, a.base_trials, a.bits_cache, a.stride)
    print_table(result, Console())
    write_json(a.path / "metrics.json", result)


if __name__ == "__main__":
    main()
