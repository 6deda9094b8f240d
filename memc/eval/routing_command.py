"""`memc routing`: how consistently an MoE model routes, and what an expert cache of a few slots per layer would hit.

The per-token top-k traces come from memc's own passes on the captured program (detect-moe, then moe-calibrate's
``collect``), so every router memc detects is traced the way it runs. The metrics are memc.eval.routing's. Routing
statistics describe a model, they fit nothing to it, so held-out text is allowed here (unlike calibration).
"""
from __future__ import annotations

import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from memc.atomic import write_json
from memc.errors import ConfigError, MemcError
from memc.eval import routing
from memc.eval.text import HELD_OUT_PREFIX, TRAIN_PREFIX, load_text

DEFAULT_SEGMENTS = [4, 16, 64, 256]
DEFAULT_MULTIPLES = [1, 2, 3, 4]


@dataclass
class RoutingRequest:
    source: str
    texts: list[str] = field(default_factory=lambda: ["heldout:code"])
    windows: int = 32
    context: int = 1024
    segments: list[int] = field(default_factory=lambda: list(DEFAULT_SEGMENTS))
    multiples: list[int] = field(default_factory=lambda: list(DEFAULT_MULTIPLES))  # cache slots = multiple x top-k
    batch: int = 1
    threads: int = 1
    trust_pickle: bool = False
    json_out: str | None = None
    plot_dir: str | None = None


def command_line(req: RoutingRequest) -> str:
    """The `memc routing` command that runs ``req`` (recorded in the JSON, so a result says how to reproduce it)."""
    args = ["memc", "routing", req.source]
    for text in req.texts:
        args += ["--text", text]
    args += ["--windows", str(req.windows), "--context", str(req.context), "--segments", ",".join(map(str, req.segments)),
             "--cache", ",".join(map(str, req.multiples)), "--batch", str(req.batch), "--threads", str(req.threads)]
    if req.trust_pickle:
        args.append("--trust-pickle")
    if req.json_out:
        args += ["--json", req.json_out]
    if req.plot_dir:
        args += ["--plot", req.plot_dir]
    return shlex.join(args)


# --- inputs, checked before the long work starts ------------------------------------------------------------------
def routing_text(spec: str) -> bytes:
    """``trainsplit:DOMAIN``, ``heldout:DOMAIN`` or a UTF-8 file; errors name ``--text``."""
    from memc.reference import corpus

    named = f"{' | '.join(p + d for p in (TRAIN_PREFIX, HELD_OUT_PREFIX) for d in corpus.ALL_DOMAINS)} or a UTF-8 file"
    if spec.startswith(TRAIN_PREFIX):
        domain = spec[len(TRAIN_PREFIX):]
        if domain not in corpus.ALL_DOMAINS:
            raise ConfigError(f"--text: unknown corpus {spec!r}; use {named}")
        return corpus.train_bytes(domain)
    if spec.startswith(HELD_OUT_PREFIX):
        domain = spec[len(HELD_OUT_PREFIX):]
        if domain not in corpus.ALL_DOMAINS:
            raise ConfigError(f"--text: unknown corpus {spec!r}; use {named}")
    elif not Path(spec).exists() and ":" in spec:
        raise ConfigError(f"--text: unknown text {spec!r}; use {named}")
    try:
        return load_text(spec)
    except MemcError as exc:
        raise ConfigError(f"--text: {exc}") from None


def _check_writable(directory: Path, option: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"{option}: cannot write into {directory}: {exc.strerror or exc}") from None


def check_request(req: RoutingRequest) -> None:
    if not req.texts:
        raise ConfigError("--text: give at least one text")
    if len(set(req.texts)) != len(req.texts):
        raise ConfigError("--text: each text may be given once")
    if req.windows < 1:
        raise ConfigError(f"--windows must be >= 1, got {req.windows}")
    if req.context < 2:
        raise ConfigError(f"--context must be >= 2, got {req.context}")
    if req.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {req.batch}")
    if not req.segments or min(req.segments) < 1:
        raise ConfigError("--segments: give segment lengths >= 1")
    if not req.multiples or min(req.multiples) < 1:
        raise ConfigError("--cache: give cache sizes as multiples >= 1 of top-k")
    if req.plot_dir:
        _check_writable(Path(req.plot_dir), "--plot")
    if req.json_out:
        if Path(req.json_out).is_dir():
            raise ConfigError(f"--json: {req.json_out} is a directory; give a file name")
        _check_writable(Path(req.json_out).parent, "--json")


# --- traces from memc's own passes ------------------------------------------------------------------------------
def moe_program(source: str, trust_pickle: bool):
    """The captured program with its MoE sites (detect-moe); a model without an MoE layer is refused."""
    from memc.capture import capture
    from memc.config import ToolchainConfig
    from memc.passes.base import PassContext
    from memc.passes.moe.detect import SITES_KEY, DetectMoE

    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.onnx")):
        raise MemcError(f"{source} is a compiled artifact: its ONNX graphs cannot be traced by memc's passes",
                        hint="pass the model it was compiled from (a Hugging Face directory, .pt2, ...)")
    program = capture(source, ToolchainConfig(), trust_pickle=trust_pickle)
    if program.source.task != "causal-lm":
        raise MemcError(f"{source} is a {program.source.task} model; `memc routing` routes text through a causal LM")
    program = DetectMoE().run(program, PassContext()).program
    sites = program.annotations[SITES_KEY]
    if not sites:
        raise MemcError(f"{source} has no MoE layer (detect-moe found no router -> top-k -> experts)")
    return program, sites


def text_traces(program, sites, data: bytes, req: RoutingRequest, spec: str) -> tuple[list[np.ndarray], int]:
    """Per MoE layer a [windows, tokens, k] trace of ``data``'s evenly spaced windows, and the window count."""
    from memc.passes.moe.calibrate import collect, token_windows, window_inputs

    windows = token_windows(program, data, req.windows, req.context, f"--text {spec}")
    layers = collect(program, sites, window_inputs(program, windows, req.batch))
    n, length = windows.shape
    return [layer.trace.long().numpy().reshape(n, length, layer.top_k) for layer in layers], n


# --- the measurements ---------------------------------------------------------------------------------------------
def layer_metrics(trace: np.ndarray, num_experts: int, segments: list[int], slots: list[int]) -> dict[str, Any]:
    """One layer on one text: SRP and SCH per segment length, hit rate per policy and cache size, expert load."""
    srp = {}
    for m in segments:
        r = routing.srp(trace, num_experts, m)
        if r is not None:
            srp[str(m)] = r.as_dict()
    usable = [m for m in segments if m <= trace.shape[1]]
    return {
        "srp": srp,
        "sch": {str(m): {str(c): routing.sch(trace, num_experts, m, c) for c in slots} for m in usable},
        "cache": {p: {str(c): routing.hit_rate(trace, num_experts, c, p) for c in slots} for p in routing.POLICIES},
        "load": routing.expert_load(trace, num_experts).tolist(),
    }


def analyse(req: RoutingRequest, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole measurement; ``progress`` hears one line per stage (the CLI prints them to stderr)."""
    say = progress or (lambda _line: None)
    check_request(req)
    torch.set_num_threads(req.threads)
    data = {spec: routing_text(spec) for spec in req.texts}
    start = time.perf_counter()
    program, sites = moe_program(req.source, req.trust_pickle)
    layers = [{"layer": s.layer, "path": s.path, "experts": s.num_experts, "top_k": s.top_k,
               "slots": [m * s.top_k for m in req.multiples], "texts": {}} for s in sites]
    texts = []
    say(f"{req.source}: {len(sites)} MoE layers, captured in {time.perf_counter() - start:.0f} s")
    for spec, raw in data.items():
        began = time.perf_counter()
        traces, n = text_traces(program, sites, raw, req, spec)
        traced = time.perf_counter() - began
        texts.append({"text": spec, "windows": n, "tokens_per_window": int(traces[0].shape[1]),
                      "tokens": int(traces[0].shape[0] * traces[0].shape[1])})
        for entry, site, trace in zip(layers, sites, traces):
            entry["texts"][spec] = layer_metrics(trace, site.num_experts, req.segments, entry["slots"])
        say(f"{spec}: {n} windows traced in {traced:.0f} s, measured in {time.perf_counter() - began - traced:.0f} s")
    for entry in layers:
        loads = {spec: np.array(v["load"]) for spec, v in entry["texts"].items()}
        entry["load_jsd_bits"] = [{"a": a, "b": b, "bits": routing.jsd_bits(loads[a], loads[b])}
                                  for a, b in combinations(req.texts, 2)]
    return {
        "command": command_line(req),
        "source": req.source,
        "tokenizer": "hf" if _has_tokenizer(program) else "bytes",
        "windows_requested": req.windows,
        "context": req.context,
        "batch": req.batch,
        "threads": req.threads,
        "segments": req.segments,
        "cache_multiples_of_top_k": req.multiples,
        "accounting": "Each window is an independent sequence; tokens in order, each needs its k experts resident; "
                      "filling an empty slot is not a miss (caches start warm, as in moe-lrc)",
        "texts": texts,
        "layers": layers,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _has_tokenizer(program) -> bool:
    from memc.tokenizer_files import has_tokenizer

    return program.source.kind == "hf" and has_tokenizer(Path(program.source.path))


# --- output -------------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def print_result(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:  # logs and pipes: wide enough that no column is cut
        console = Console(width=max(console.width, 160))
    layers = result["layers"]
    texts = [t["text"] for t in result["texts"]]
    sample = ", ".join(f"{t['text']}: {t['windows']} windows x {t['tokens_per_window']} = {t['tokens']:,} tokens"
                       for t in result["texts"])
    console.print(f"memc routing: {result['source']} ({result['tokenizer']} tokens; {sample})", highlight=False)
    segs = [str(m) for m in result["segments"]]

    mults = result["cache_multiples_of_top_k"]
    at = mults.index(2) if 2 in mults else 0  # SCH is shown at 2k slots (the knee moe-lrc reports), all in the JSON
    t = Table(title=f"routing consistency by segment length m: SRP (segment routing best F1) and SCH (segment cache "
                    f"best hit rate) at {mults[at]}k slots", title_justify="left")
    t.add_column("layer")
    t.add_column("text")
    for m in segs:
        t.add_column(f"SRP m={m}", justify="right")
    for m in segs:
        t.add_column(f"SCH m={m}", justify="right")
    for text in texts:
        for entry in layers + [None]:
            rows = layers if entry is None else [entry]
            srp = [_mean([e["texts"][text]["srp"][m]["f1"] for e in rows if m in e["texts"][text]["srp"]]) for m in segs]
            sch = [_mean([e["texts"][text]["sch"][m][str(e["slots"][at])] for e in rows if m in e["texts"][text]["sch"]])
                   for m in segs]
            t.add_row("mean" if entry is None else f"{entry['layer']} {entry['path']}", text,
                      *[_fmt(v) for v in srp + sch])
    console.print(t)

    c = Table(title="expert-cache hit rate LRU / LFU / Belady (best possible) by slots per layer (k = top-k)",
              title_justify="left")
    c.add_column("layer")
    c.add_column("text")
    for mult in mults:
        c.add_column(f"{mult}k slots", justify="right")
    for text in texts:
        for entry in layers + [None]:
            rows = layers if entry is None else [entry]
            cells = []
            for i in range(len(mults)):
                rates = [_mean([e["texts"][text]["cache"][p][str(e["slots"][i])] for e in rows]) for p in routing.POLICIES]
                cells.append(" / ".join(_fmt(r) for r in rates))
            c.add_row("mean" if entry is None else f"{entry['layer']} {entry['path']}", text, *cells)
    console.print(c)

    if len(texts) > 1:
        j = Table(title="expert-load divergence between texts: Jensen-Shannon (bits, 0 = same load, 1 = disjoint)",
                  title_justify="left")
        j.add_column("texts")
        for e in layers:
            j.add_column(f"layer {e['layer']}", justify="right")
        for i, pair in enumerate(layers[0]["load_jsd_bits"]):
            j.add_row(f"{pair['a']} vs {pair['b']}", *[f"{e['load_jsd_bits'][i]['bits']:.4f}" for e in layers])
        console.print(j)


def _fmt(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def plot_result(result: dict[str, Any], out_dir: Path) -> Path:
    """One PNG: hit rate vs cache slots, one panel per MoE layer, LRU / LFU / Belady by colour, texts by line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    layers = result["layers"]
    styles = ["-", "--", ":", "-."]
    colors = {"lru": "tab:blue", "lfu": "tab:orange", "belady": "tab:green"}
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.6), sharey=True, squeeze=False)
    for ax, entry in zip(axes[0], layers):
        for i, t in enumerate(result["texts"]):
            m = entry["texts"][t["text"]]
            for p in routing.POLICIES:
                ax.plot(entry["slots"], [m["cache"][p][str(c)] for c in entry["slots"]], styles[i % len(styles)],
                        color=colors[p], marker="o", markersize=3)
        ax.set_title(f"layer {entry['layer']} (E={entry['experts']}, k={entry['top_k']})", fontsize=9)
        ax.set_xlabel("cache slots per layer")
        ax.set_xticks(entry["slots"])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit rate")
    handles = [Line2D([], [], color=c, label=p.upper() if p != "belady" else "Belady") for p, c in colors.items()]
    handles += [Line2D([], [], color="gray", linestyle=styles[i % len(styles)], label=t["text"])
                for i, t in enumerate(result["texts"])]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"{Path(result['source']).name}: expert-cache hit rate", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', Path(result['source']).name) or 'model'}_routing.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def save_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
