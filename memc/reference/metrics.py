"""Held-out quality of a reference checkpoint, next to general-purpose compressors on the same bytes.

``python -m memc.reference.metrics models/ref-llama`` prints a table and writes metrics.json.

Bits/byte use non-overlapping windows of `context` tokens: window k covers tokens [kC, (k+1)C] and predicts
tokens kC+1 .. (k+1)C, so every held-out token but the first is scored exactly once, with 0..C-1 tokens of
context (C/2 on average), and the bits are divided by the exact bytes the scored tokens span. Compressors
are run on the same byte stream, whole (their dictionary spans every held-out file, which a 1024-token
context cannot) and per document (each file compressed alone).
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, PreTrainedModel

from memc.reference import corpus, tokenizer
from memc.reference.models import CONTEXT

XZ_PRESET = 9 | lzma.PRESET_EXTREME


def load(path: str | Path, **kwargs) -> PreTrainedModel:
    """A committed checkpoint in float32 (its bf16 weights upcast exactly), never downloading."""
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs).eval()


def is_moe(model: PreTrainedModel) -> bool:
    return getattr(model.config, "num_experts", None) is not None


def windows(tokens: np.ndarray, context: int) -> list[torch.Tensor]:
    """Non-overlapping windows of context + 1 tokens that share their boundary token."""
    return [torch.from_numpy(tokens[i : i + context + 1]) for i in range(0, len(tokens) - 1, context)]


class RoutingStats:
    """Per-layer expert assignment counts and summed per-token router entropy."""

    def __init__(self, layers: int, experts: int) -> None:
        self.counts = np.zeros((layers, experts), np.int64)
        self.entropy_sum = np.zeros(layers)
        self.tokens = 0

    def add(self, router_logits: tuple[torch.Tensor, ...], top_k: int) -> None:
        for layer, logits in enumerate(router_logits):
            logp = F.log_softmax(logits.float(), dim=-1)
            self.entropy_sum[layer] += -(logp.exp() * logp).sum().item() / math.log(2)
            chosen = logp.topk(top_k, dim=-1).indices.flatten()
            self.counts[layer] += np.bincount(chosen.numpy(), minlength=self.counts.shape[1])
        self.tokens += router_logits[0].shape[0]

    def summary(self) -> list[dict]:
        """Per layer: mean token entropy, entropy of the expert load (bits; max log2(experts)),
        top-expert share (uniform = 1/experts, full collapse with top-2 = 1/2) and the load histogram."""
        rows = []
        for layer, counts in enumerate(self.counts):
            load = counts / counts.sum()
            nz = load[load > 0]
            rows.append({
                "layer": layer,
                "token_entropy_bits": round(float(self.entropy_sum[layer] / self.tokens), 4),
                "load_entropy_bits": round(float(-(nz * np.log2(nz)).sum()), 4),
                "top_expert_share": round(float(load.max()), 4),
                "load_histogram": counts.tolist(),
            })
        return rows


def target_bytes(x: torch.Tensor, lengths: np.ndarray) -> int:
    """Bytes spanned by the predicted tokens x[:, 1:] of a batch of windows."""
    return int(lengths[x[:, 1:].numpy()].sum())


@torch.inference_mode()
def nll_bits(model: PreTrainedModel, x: torch.Tensor, routing: RoutingStats | None = None) -> float:
    """Summed next-byte negative log-likelihood (bits) of x[:, 1:] given the preceding bytes of each row."""
    out = model(input_ids=x[:, :-1], output_router_logits=routing is not None or None)
    nll = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
    if routing is not None:
        routing.add(out.router_logits, model.config.num_experts_per_tok)
    return nll.item() / math.log(2)


def bits_per_byte(
    model: PreTrainedModel, tokens: np.ndarray, lengths: np.ndarray, context: int = CONTEXT, batch: int = 8,
    routing: RoutingStats | None = None, every: int = 1,
) -> tuple[float, int]:
    """(bits/byte, bytes scored) over `tokens` in non-overlapping windows (windows 0, every, 2*every, ... : an
    unselected sample when every > 1); `lengths[id]` is the bytes an id spans. float32 unless autocast is on."""
    total, count = 0.0, 0
    chunks = windows(tokens, context)[::every]
    for length in sorted({len(w) for w in chunks}):  # the last window may be shorter
        same = [w for w in chunks if len(w) == length]
        for i in range(0, len(same), batch):
            x = torch.stack(same[i : i + batch])
            total += nll_bits(model, x, routing)
            count += target_bytes(x, lengths)
    return total / count, count


def quick_bits_per_byte(
    model: PreTrainedModel, tokens: np.ndarray, lengths: np.ndarray, n: int, context: int = CONTEXT,
    autocast: bool = True,
) -> float:
    """Cheap estimate during training: n full windows spread evenly over `tokens` (bf16 autocast by default)."""
    starts = np.linspace(0, len(tokens) - context - 1, n).astype(int)
    x = torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return round(nll_bits(model, x) / target_bytes(x, lengths), 4)


def compressor_bits_per_byte(docs: tuple[corpus.Document, ...]) -> dict[str, float]:
    """gzip -9 and xz (preset 9 | extreme) on the joined stream and summed over documents, headers included."""
    stream = corpus.join(docs)
    n = len(stream)
    gz = lambda b: len(gzip.compress(b, compresslevel=9))  # noqa: E731
    xz = lambda b: len(lzma.compress(b, preset=XZ_PRESET))  # noqa: E731
    return {
        "gzip9": round(8 * gz(stream) / n, 4),
        "xz9e": round(8 * xz(stream) / n, 4),
        "gzip9_per_doc": round(8 * sum(gz(d.data) for d in docs) / n, 4),
        "xz9e_per_doc": round(8 * sum(xz(d.data) for d in docs) / n, 4),
    }


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, 0..1) of two distributions given as counts or weights."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def load_divergence(routing: dict[str, RoutingStats]) -> list[dict]:
    """Per layer: the JS divergence (bits) of the expert loads of every pair of domains, and their mean."""
    names = list(routing)
    rows = []
    for layer in range(next(iter(routing.values())).counts.shape[0]):
        pairs = {f"{a}|{b}": round(js_divergence_bits(routing[a].counts[layer].astype(float),
                                                      routing[b].counts[layer].astype(float)), 4)
                 for i, a in enumerate(names) for b in names[i + 1:]}
        rows.append({"layer": layer, "pairs": pairs, "mean": round(float(np.mean(list(pairs.values()))), 4)})
    return rows


def checkpoint_training(path: str | Path) -> tuple[tuple[str, ...], int]:
    """The corpus domains and context a checkpoint was trained on (its train_config.json)."""
    f = Path(path) / "train_config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    return tuple(cfg.get("corpus", {}).get("domains", corpus.DOMAINS)), int(cfg.get("settings", {}).get("context", CONTEXT))


def measure(path: str | Path, context: int | None = None, max_windows: int | None = None) -> dict:
    """Held-out measurement of a checkpoint (float32) on the domains it was trained on; routing stats for MoE.
    Every window is scored unless a domain has more than ``max_windows``: then every N-th (N = the smallest
    that fits), an unselected sample recorded in the result."""
    model = load(path)
    tok = tokenizer.load_tokenizer(path)
    lengths = tokenizer.byte_lengths(tok)
    domains, trained_context = checkpoint_training(path)
    context = context or trained_context
    result: dict = {"context": context, "windows": "non-overlapping", "dtype": "float32",
                    "tokenizer": tokenizer.describe(tok), "split_hash": corpus.split_hash(domains), "domains": {}}
    routing_by_domain = {}
    for domain in domains:
        docs = corpus.split(domain, held_out=True)
        routing = RoutingStats(model.config.num_hidden_layers, model.config.num_experts) if is_moe(model) else None
        tokens = tokenizer.encode(corpus.join(docs), tok)
        total = len(windows(tokens, context))
        every = 1 if max_windows is None else max(1, math.ceil(total / max_windows))
        bpb, scored = bits_per_byte(model, tokens, lengths, context, routing=routing, every=every)
        result["domains"][domain] = {
            "bytes": scored, "tokens": len(tokens), "windows": len(range(0, total, every)), "windows_total": total,
            "every": every, "bits_per_byte": round(bpb, 4), "ppl_per_byte": round(2**bpb, 4),
            **compressor_bits_per_byte(docs),
        }
        if routing is not None:
            routing_by_domain[domain] = routing
    if routing_by_domain:
        result["routing"] = {d: r.summary() for d, r in routing_by_domain.items()}
        if len(routing_by_domain) > 1:
            result["load_divergence_bits"] = load_divergence(routing_by_domain)
    return result


def print_table(result: dict, console: Console) -> None:
    table = Table(title=f"held-out bits/byte (context {result['context']} tokens, {result.get('tokenizer', 'bytes')}, "
                        f"{result['windows']} windows)")
    for col in ("domain", "windows", "bytes", "model", "ppl/byte", "gzip -9", "xz -9e", "gzip/doc", "xz/doc"):
        table.add_column(col, justify="right")
    for domain, m in result["domains"].items():
        sample = "all" if m.get("every", 1) == 1 else f"1/{m['every']}"
        table.add_row(domain, f"{m.get('windows', '')} ({sample})", f"{m['bytes']:,}", f"{m['bits_per_byte']:.3f}", f"{m['ppl_per_byte']:.3f}",
                      *(f"{m[k]:.3f}" for k in ("gzip9", "xz9e", "gzip9_per_doc", "xz9e_per_doc")))
    console.print(table)
    if "load_divergence_bits" in result:
        jt = Table(title="Jensen-Shannon divergence of expert loads between domains (bits; 0 = same, 1 = disjoint)")
        rows = result["load_divergence_bits"]
        jt.add_column("pair")
        for r in rows:
            jt.add_column(f"layer {r['layer']}", justify="right")
        for pair in rows[0]["pairs"]:
            jt.add_row(pair, *(f"{r['pairs'][pair]:.3f}" for r in rows))
        jt.add_row("mean", *(f"{r['mean']:.3f}" for r in rows))
        console.print(jt)
    for domain, layers in result.get("routing", {}).items():
        rt = Table(title=f"routing on held-out {domain}")
        for col in ("layer", "token entropy", "load entropy", "top-expert share", "load histogram"):
            rt.add_column(col, justify="right")
        for r in layers:
            rt.add_row(str(r["layer"]), f"{r['token_entropy_bits']:.3f}", f"{r['load_entropy_bits']:.3f}",
                       f"{r['top_expert_share']:.3f}", " ".join(map(str, r["load_histogram"])))
        console.print(rt)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--context", type=int, help="tokens per window (default: the checkpoint's training context)")
    p.add_argument("--max-windows", type=int, help="score every N-th window where a domain has more than this many")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(a.path, a.context, a.max_windows)
    print_table(result, Console())
    (a.path / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
