"""Memory-caching attention on ref-llama: does the memory carry information, and what does the state cost?

    python -m benchmarks.memory_caching [--variants gated,...] [--stride 1] [--recall]

For context 1024 on the WHOLE held-out code set (or every --stride-th window, stated in the table):
(a) the original model, (b) window-only attention at the same window (the memory branch removed; same weights),
(c) memc after distillation (weights from ``models/ref-llama-mc/<variant>``, made by
``python -m memc.reference.memory_caching``), (d) (c) with its memory ablated. Bits/byte overall and on positions
>= 512, each Δ against (a) with the number of windows and the paired standard error, and the share of (b)'s gap
that (c) closes. ``--recall`` adds token accuracy by distance on the recall-capable model
(``models/ref-llama-recall`` with ``models/ref-llama-recall-mc/<variant>``). State bytes at 1k / 8k / 32k tokens
against the original's fp32 KV cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Table, cpu_info

ROOT = Path(__file__).resolve().parents[1]
STATE_CONTEXTS = (1024, 8192, 32768)


def _windows(model: str, context: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out code as non-overlapping windows (every `stride`-th), the bytes each scored token spans, and the
    windows' indices in the whole set."""
    from memc.eval.backends import ModelInfo
    from memc.eval.text import load_text, tokenize

    info = ModelInfo("causal-lm", ["input_ids"], None, None, 0, Path(model))
    ids, spans = tokenize(load_text("heldout:code"), info)
    n = len(ids) // context
    keep = np.arange(0, n, stride)
    return ids[: n * context].reshape(n, context)[keep], spans[: n * context].reshape(n, context)[keep, 1:], keep


def _program(model: str, layer: dict | None, weights: Path | None):
    from memc.capture import capture
    from memc.config import ToolchainConfig
    from memc.passes.base import PassContext, create_pass
    from memc.passes.manager import PassManager

    program = capture(model, ToolchainConfig())
    if layer is None:
        return program
    options = {**layer, **({"weights": str(weights)} if weights else {})}
    passes = [create_pass("detect-attention", {}, "bench[0]"), create_pass("memory-caching", options, "bench[1]")]
    return PassManager(passes).run(program, PassContext())


def set_memory(program, enabled: bool) -> None:
    for m in program.module.modules():
        if hasattr(m, "memory_enabled"):
            m.memory_enabled = enabled


class _Chunked:
    """A backend that feeds at most `batch` rows at a time (the recall probe sends all trials at once)."""

    def __init__(self, backend, batch: int):
        self.backend, self.batch, self.info = backend, batch, backend.info

    def forward(self, feeds: dict) -> np.ndarray:
        ids = feeds["input_ids"]
        return np.concatenate([self.backend.forward({"input_ids": ids[i : i + self.batch]})
                               for i in range(0, len(ids), self.batch)])


class NllCache:
    """Per-window NLL of each scored configuration, kept on disk by window index, so a later run (another variant,
    another stride, the whole set after a sample) scores only the windows it has not scored yet. The key hashes
    what the numbers depend on: the model's files, the layer options and weights, the memory switch and the
    context; each window's ids are stored and compared, so a changed text or tokenizer is never served stale."""

    def __init__(self, root: Path | None):
        self.root = root

    @staticmethod
    def key(model: str, layer: dict | None, weights: Path | None, memory: bool, context: int) -> str:
        h = hashlib.sha256(json.dumps([layer, memory, context], sort_keys=True).encode())
        files = sorted(p for p in Path(model).iterdir() if p.is_file()) + ([weights] if weights else [])
        for f in files:
            h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()[:24]

    def nll(self, key: str, program, windows: np.ndarray, index: np.ndarray, label: str) -> np.ndarray:
        from memc.eval.backends import TorchBackend
        from memc.eval.perplexity import window_nll

        stored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        path = self.root / f"{key}.npz" if self.root else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                stored = {int(i): (ids, row) for i, ids, row in zip(z["index"], z["ids"], z["nll"])}
        todo = [j for j, i in enumerate(index)
                if int(i) not in stored or not np.array_equal(stored[int(i)][0], windows[j])]
        start = time.perf_counter()
        if todo:
            rows = window_nll(TorchBackend(program), windows[todo], batch=2)
            for j, row in zip(todo, rows):
                stored[int(index[j])] = (windows[j], row)
        print(f"  {label}: {len(todo)} of {len(windows)} windows scored in {time.perf_counter() - start:.0f} s "
              f"({len(windows) - len(todo)} cached)", file=sys.stderr, flush=True)
        if path is not None and todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            order = sorted(stored)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, index=np.array(order), ids=np.stack([stored[i][0] for i in order]),
                     nll=np.stack([stored[i][1] for i in order]))
            tmp.replace(path)
        return np.stack([stored[int(i)][1] for i in index])


def state_bytes(layer: dict, layers: int, kv_heads: int, head_dim: int, context: int) -> int:
    """Decode state of every memory-caching layer after `context` tokens (batch 1, fp32).

    Closed segments after t tokens: those whose last token has left the window, (t - window) // segment; a cap
    keeps at most max_segments of them.
    """
    from memc.nn.mc_state import MemoryCachingState
    from memc.nn.selective_state import SelectiveState

    closed = max(context - layer["window"], 0) // layer["segment"]
    if layer.get("variant") == "select":  # raw window + open segment + the pool of kept tokens (with their scores)
        kept = (layer.get("keep") or layer["segment"]) * closed
        cap = layer.get("max_tokens", 0)
        state = SelectiveState.zeros(1, kv_heads, layer["window"], layer["segment"], min(kept, cap) if cap else kept,
                                     head_dim)
        return layers * state.nbytes()
    slots = min(closed, layer["max_segments"]) if layer["max_segments"] else closed
    state = MemoryCachingState.zeros(1, kv_heads, layer["window"], head_dim, layer["feature_dim"], slots)
    return layers * state.nbytes()


def model_dims(model: str) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from the model's config.json: what state_bytes / kv_bytes count with."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    return (cfg["num_hidden_layers"], cfg["num_key_value_heads"],
            cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def kv_bytes(layers: int, kv_heads: int, head_dim: int, context: int) -> int:
    return layers * 2 * kv_heads * context * head_dim * 4


def state_table(command: str, layers: dict[str, dict], dims: tuple[int, int, int]) -> Table:
    """State bytes of each variant's layers (as distilled; an uncapped segment memory also with max_segments = 8)
    at 1k / 8k / 32k tokens, against the original's KV cache."""
    forms = []
    for v, layer in layers.items():
        forms.append((v, layer))
        if layer.get("variant") != "select" and not layer.get("max_segments"):
            forms.append((f"{v}, max_segments = 8", {**layer, "max_segments": 8}))
    rows = []
    for ctx in STATE_CONTEXTS:
        kv = kv_bytes(*dims, ctx)
        row: list = [ctx, kv]
        for _, layer in forms:
            mc = state_bytes(layer, *dims, ctx)
            row += [mc, f"{kv / mc:.1f}x"]
        rows.append(row)
    cols = ["context", "(a) KV cache bytes"] + [c for name, _ in forms for c in (f"{name} state bytes", "smaller by")]
    table = Table("memory_caching_state", command, cols, rows)
    table.notes.append(f"batch 1, fp32, all {dims[0]} layers; layer options: "
                       + "; ".join(f"{v} {layer}" for v, layer in layers.items()) + ".")
    return table


def _layer(variant_dir: Path) -> dict:
    return json.loads((variant_dir / "metrics.json").read_text())["layer"]


def quality(model: str, mc_dir: Path, variants: list[str], stride: int, context: int,
            cache: NllCache) -> tuple[list, dict]:
    from memc.eval.paired import paired_delta

    windows, spans, index = _windows(model, context, stride)
    found = [v for v in variants if (mc_dir / v / "layers.safetensors").is_file()]
    if not found:
        raise SystemExit(f"no distilled weights under {mc_dir}/<variant>/: run python -m memc.reference.memory_caching")
    print(f"quality: {len(windows)} windows of {context} tokens", file=sys.stderr)

    def score(label: str, layer: dict | None, weights: Path | None, memory: bool) -> np.ndarray:
        program = _program(model, layer, weights)
        set_memory(program, memory)
        return cache.nll(cache.key(model, layer, weights, memory, context), program, windows, index, label)

    nll = {"a": score("(a) original", None, None, True)}
    raw: dict = {"windows": len(windows), "stride": stride}
    rows = []
    nll["b"] = score("(b) window only", _layer(mc_dir / found[0]), None, False)
    gap = {pos: paired_delta(nll["a"], nll["b"], spans, pos) for pos in (0, 512)}

    def row(label: str, key: str, variant: str) -> None:
        d = {pos: paired_delta(nll["a"], nll[key], spans, pos) for pos in (0, 512)}
        raw[key] = {str(p): v.as_dict() for p, v in d.items()}
        closed = [1 - d[p].delta / gap[p].delta if key not in ("a", "b") and gap[p].delta else None for p in (0, 512)]
        rows.append([label, variant, d[0].windows, d[0].bits_per_byte_b, f"{d[0].delta:+.4f} ± {d[0].se:.4f}",
                     f"{100 * d[0].per_byte_ppl_change:+.2f}%", d[512].bits_per_byte_b,
                     f"{d[512].delta:+.4f} ± {d[512].se:.4f}",
                     " / ".join("-" if c is None else f"{100 * c:.0f}%" for c in closed)])

    row("(a) original", "a", "-")
    row("(b) window only", "b", "-")
    for v in found:
        layer, weights = _layer(mc_dir / v), mc_dir / v / "layers.safetensors"
        nll[f"c-{v}"] = score(f"(c) {v}", layer, weights, True)
        nll[f"d-{v}"] = score(f"(d) {v} memory ablated", layer, weights, False)
        row("(c) memc distilled", f"c-{v}", v)
        row("(d) memc, memory ablated", f"d-{v}", v)
        raw[f"layer-{v}"] = layer
    return rows, raw


def _with_pool(layer: dict, max_tokens: int | None) -> dict:
    """A select layer's options with another pool cap (it changes no weight: a deployment option); others as
    they are."""
    return {**layer, "max_tokens": max_tokens} if max_tokens is not None and layer.get("variant") == "select" else layer


def recall(model: str, mc_dir: Path, variants: list[str], distances: list[int], trials: int,
           seed: int = 0, max_tokens: int | None = None) -> tuple[list, dict]:
    from memc.eval.backends import TorchBackend
    from memc.eval.recall import recall_probe
    from memc.eval.text import load_text, text_codec

    filler = load_text("heldout:code")
    results: dict[str, list] = {}

    def probe(label: str, program) -> None:
        backend = _Chunked(TorchBackend(program), 4)
        codec = text_codec(backend.info)
        results[label] = [p.as_dict() for p in recall_probe(backend, filler, distances, 1024, trials, seed, codec.encode)]
        print(f"  recall {label}: {[round(p['token_accuracy'], 2) for p in results[label]]}", file=sys.stderr)

    probe("(a) original", _program(model, None, None))
    found = [v for v in variants if (mc_dir / v / "layers.safetensors").is_file()]
    for i, v in enumerate(found):
        program = _program(model, _with_pool(_layer(mc_dir / v), max_tokens), mc_dir / v / "layers.safetensors")
        if i == 0:
            set_memory(program, False)
            probe("(b) window only", program)
            set_memory(program, True)
        probe(f"(c) {v}", program)
        set_memory(program, False)
        probe(f"(d) {v} memory ablated", program)
    rows = [[label, *[f"{p['token_accuracy']:.2f} ({p['control_token_accuracy']:.2f})" for p in points]]
            for label, points in results.items()]
    return rows, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--mc-dir", type=Path, default=ROOT / "models" / "ref-llama-mc")
    ap.add_argument("--variants", default="gated,residual,soup,sparse")
    ap.add_argument("--stride", type=int, default=1, help="evaluate every stride-th held-out window (1 = all)")
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "bench-cache" / "memory_caching",
                    help="per-window NLL kept here by configuration; a rerun scores only new windows ('' = off)")
    ap.add_argument("--recall", action="store_true")
    ap.add_argument("--recall-only", action="store_true",
                    help="only the recall table (skips the bits/byte and state tables of --model)")
    ap.add_argument("--recall-model", default="models/ref-llama-recall")
    ap.add_argument("--recall-mc-dir", type=Path, default=ROOT / "models" / "ref-llama-recall-mc")
    ap.add_argument("--recall-distances", default="16,64,160,288,416,672,896")
    ap.add_argument("--recall-trials", type=int, default=32)
    ap.add_argument("--recall-seed", type=int, default=0,
                    help="the probe's seed (keys, values, positions); another seed is a fresh sample of trials")
    ap.add_argument("--recall-max-tokens", type=int,
                    help="select layers of the recall model read a pool of this many tokens instead of the one they "
                         "were distilled with (the pool changes no weight)")
    ap.add_argument("--recall-table", default="memory_caching_recall",
                    help="name of the recall table under benchmarks/results/ (another name keeps the committed one)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    variants = [v for v in args.variants.split(",") if v]
    command = "python -m benchmarks.memory_caching " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.recall_only:
        recall_table(args, variants, command)
        return 0
    rows, raw = quality(args.model, args.mc_dir, variants, args.stride, 1024,
                        NllCache(args.cache if str(args.cache) not in ("", ".") else None))
    sample = "all" if args.stride == 1 else f"every {args.stride}th"
    table = Table("memory_caching", command, [
        "model", "variant", "windows", "bits/byte", "Δ ± SE", "Δ per-byte ppl", "bits/byte pos ≥ 512",
        "Δ ± SE pos ≥ 512", "gap to (a) closed (all / ≥ 512)"], rows, raw=raw)
    table.notes.append(f"Held-out code, {sample} of the non-overlapping 1024-token windows ({raw['windows']} "
                       f"windows); Δ against (a), paired standard error over windows. CPU: {cpu_info()}.")
    state = state_table(command, {k[len("layer-"):]: v for k, v in raw.items() if k.startswith("layer-")},
                        model_dims(args.model))
    print(table.markdown())
    print(state.markdown())
    table.write()
    state.write()
    if args.recall:
        recall_table(args, variants, command)
    return 0


def recall_table(args: argparse.Namespace, variants: list[str], command: str) -> None:
    r_rows, r_raw = recall(args.recall_model, args.recall_mc_dir, variants,
                           [int(d) for d in args.recall_distances.split(",")], args.recall_trials, args.recall_seed,
                           args.recall_max_tokens)
    rec = Table(args.recall_table, command, ["model", *[f"d={d}" for d in args.recall_distances.split(",")]],
                r_rows, raw=r_raw)
    layers = {v: _with_pool(_layer(args.recall_mc_dir / v), args.recall_max_tokens) for v in variants
              if (args.recall_mc_dir / v / "metrics.json").is_file()}
    shape = "; ".join(f"{v}: window {x['window']}, segment {x['segment']}, "
                      + (f"keep {x.get('keep') or x['segment']}, max_tokens {x.get('max_tokens', 0)}"
                         if x.get("variant") == "select" else f"feature_dim {x['feature_dim']}")
                      for v, x in layers.items())
    rec.notes.append(f"Token accuracy of the recalled value (control in parentheses: a different key was "
                     f"planted); {args.recall_trials} trials per distance (probe seed {args.recall_seed}), filler = held-out code; "
                     f"{shape}. "
                     f"CPU: {cpu_info()}.")
    print(rec.markdown())
    rec.write()


if __name__ == "__main__":
    raise SystemExit(main())
