"""`memc eval`: run the chosen measurements on one backend, print a table, write JSON (and PNG plots)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from memc.atomic import write_json
from memc.errors import MemcError
from memc.eval.backends import Backend, load_backend
from memc.eval.embedding import embedding_cosine, real_sentences
from memc.eval.footprint import footprint
from memc.eval.perplexity import check_context, perplexity
from memc.eval.recall import check_distances, recall_probe
from memc.eval.speed import check_speed_context, speed
from memc.eval.text import load_text, text_codec, tokenize


@dataclass
class EvalRequest:
    source: str
    text: str = "heldout:code"
    context: int = 1024
    max_windows: int | None = None
    recall: bool = False
    recall_distances: list[int] = field(default_factory=lambda: [16, 128, 512, 896])
    recall_trials: int = 16
    reference: str | None = None  # encoders: embedding cosine against this model
    sentences: int = 64
    speed_contexts: list[int] = field(default_factory=list)
    threads: int = 1
    seed: int = 0
    trust_pickle: bool = False


def evaluate(req: EvalRequest, backend: Backend | None = None) -> dict[str, Any]:
    torch.set_num_threads(req.threads)
    backend = backend or load_backend(req.source, trust_pickle=req.trust_pickle, threads=req.threads)
    info = backend.info
    result: dict[str, Any] = {"source": req.source, "backend": backend.name, "task": info.task, "seed": req.seed}
    contexts = sorted(set([req.context] + req.speed_contexts))
    # every argument is checked before the long measurements start
    if req.recall and info.task != "causal-lm":
        raise MemcError("--recall needs a causal LM")
    if info.task == "causal-lm":
        check_context(backend, req.context)  # quality: never beyond the model's positions
    for context in req.speed_contexts:
        check_speed_context(backend, context)
    if req.recall:
        check_distances(req.recall_distances, req.context)
    result["footprint"] = footprint(backend, contexts)
    if info.task == "causal-lm":
        data = load_text(req.text)
        codec = text_codec(info)
        tokens, spans = tokenize(data, info, codec)
        ppl = perplexity(backend, tokens, req.context, token_bytes=spans, max_windows=req.max_windows)
        result["perplexity"] = {"text": req.text, "tokenizer": codec.kind, **ppl.as_dict()}
        if req.recall:
            points = recall_probe(
                backend, data, req.recall_distances, req.context, req.recall_trials, req.seed, encode=codec.encode
            )
            result["recall"] = [p.as_dict() for p in points]
    elif req.reference:
        reference = load_backend(req.reference, trust_pickle=req.trust_pickle, threads=req.threads)
        sentences = real_sentences(load_text(req.text), req.sentences)
        result["embedding_cosine"] = {"reference": req.reference, **embedding_cosine(backend, reference, sentences).as_dict()}
    if req.speed_contexts:
        result["speed"] = [p.as_dict() for p in speed(backend, req.speed_contexts, seed=req.seed)]
    return result


def print_result(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"memc eval: {result['source']} ({result['backend']}, {result['task']})", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    fp = result["footprint"]
    t.add_row("parameter bytes", f"{fp['parameter_bytes']:,}")
    kind = fp.get("state_kind")
    label = {"kv": "KV-cache bytes", "memory-caching": "memory-caching state bytes (fixed)"}.get(kind, f"{kind} state bytes")
    for ctx, b in fp.get("state_bytes", fp["kv_cache_bytes"]).items():
        t.add_row(f"{label} @ {ctx} tokens", f"{b:,}")
    if fp.get("state_source"):
        t.add_row("state bytes from", fp["state_source"])
    if fp.get("note"):
        t.add_row("state", fp["note"])
    if "perplexity" in result:
        p = result["perplexity"]
        t.add_row(f"perplexity ({p['text']}, ctx {p['context']}, {p['windows']} windows)", f"{p['perplexity']:.4f}")
        t.add_row("bits per byte", f"{p['bits_per_byte']:.4f}")
    if "embedding_cosine" in result:
        c = result["embedding_cosine"]
        t.add_row(f"embedding cosine vs reference ({c['sentences']} sentences) mean", f"{c['mean']:.6f}")
        t.add_row("embedding cosine min", f"{c['min']:.6f}")
    console.print(t)
    if "recall" in result:
        r = Table(title="long-range recall (teacher-forced value tokens)", title_justify="left")
        for col in ("distance (tokens)", "token accuracy", "exact", "control (no key)"):
            r.add_column(col, justify="right")
        for p in result["recall"]:
            r.add_row(str(p["distance"]), f"{p['token_accuracy']:.3f}", f"{p['exact']:.3f}", f"{p['control_token_accuracy']:.3f}")
        console.print(r)
    if "speed" in result:
        s = Table(title="speed (median, batch 1; recompute = a forward over the whole prefix per token, *-state = "
                        "decode.onnx steps from a state of that context)", title_justify="left")
        for col in ("context", "prefill tok/s", "prefill ms", "decode ms/token", "decode mode", "state bytes"):
            s.add_column(col, justify="right")
        notes = dict.fromkeys(p["note"] for p in result["speed"] if p.get("note"))
        for p in result["speed"]:
            prefill = p["prefill_tokens_per_s"]
            mark = f" {'*' * (list(notes).index(p['note']) + 1)}" if p.get("note") else ""
            s.add_row(f"{p['context']}{mark}", "-" if prefill is None else f"{prefill:.0f}",
                      "-" if p["prefill_ms"] is None else f"{p['prefill_ms']:.1f}", f"{p['decode_ms_per_token']:.2f}",
                      p["decode_mode"], "-" if p.get("state_bytes") is None else f"{p['state_bytes']:,}")
        console.print(s)
        for i, note in enumerate(notes):
            console.print(f"{'*' * (i + 1)} {note}")


def plot_result(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots: decode state bytes vs context, recall accuracy vs distance, decode latency vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = []
    fp = result["footprint"]
    state = fp.get("state_bytes", fp["kv_cache_bytes"])
    if state:
        kind = fp.get("state_kind") or "kv"
        panels.append(("memory_vs_context.png", "context (tokens)", "decode state bytes",
                       [int(k) for k in state], [v for v in state.values()], kind))
    if "recall" in result:
        rec = result["recall"]
        panels.append(("recall_vs_distance.png", "distance (tokens)", "token accuracy",
                       [p["distance"] for p in rec], [p["token_accuracy"] for p in rec], "recall"))
    if "speed" in result:
        sp = result["speed"]
        panels.append(("decode_vs_context.png", "context (tokens)", "decode ms/token",
                       [p["context"] for p in sp], [p["decode_ms_per_token"] for p in sp], "decode"))
    for name, xlabel, ylabel, xs, ys, label in panels:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{Path(result['source']).name} ({result['backend']})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def save_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
