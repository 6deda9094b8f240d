"""`memc inspect` (what a model is made of) and `memc passes` (what memc can do to it)."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memc.capture import capture
from memc.config import ToolchainConfig
from memc.passes.attention.detect import detect_attention
from memc.passes.attention.sites import site_rows
from memc.passes.base import pass_origin, plugin_errors, registered_passes
from memc.program import Program
from memc.schema import describe_fields


def module_sizes(program: Program, depth: int) -> list[tuple[str, int, int]]:
    """(module path truncated to ``depth``, parameter count, bytes), in first-seen order."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    seen: set[int] = set()
    for name, t in program.module.named_parameters():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        parts = name.split(".")[:-1]
        key = ".".join(parts[:depth]) or "(top level)"
        counts[key][0] += t.numel()
        counts[key][1] += t.numel() * t.element_size()
    return [(k, v[0], v[1]) for k, v in counts.items()]


def inspect_model(source: str, cfg: ToolchainConfig, *, trust_pickle: bool, depth: int, as_json: bool) -> dict[str, Any]:
    program = capture(source, cfg, trust_pickle=trust_pickle)
    params, nbytes = program.parameter_stats()
    info = {
        "source": {"path": program.source.path, "kind": program.source.kind, "task": program.source.task},
        "parameters": params,
        "parameter_bytes": nbytes,
        "buffer_bytes": program.buffer_stats()[1],
        "inputs": {n: list(t.shape) for n, t in zip(program.input_names, program.example_inputs)},
        "outputs": program.output_names,
        "modules": [{"module": m, "parameters": c, "bytes": b} for m, c, b in module_sizes(program, depth)],
        "op_histogram": program.op_histogram(),
        "attention_sites": [s.as_dict() for s in detect_attention(program)],
    }
    moe_rows = moe_layers(program)
    info["moe_layers"] = moe_rows
    if as_json:
        print(json.dumps(info, indent=2))
        return info
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that no column is cut
        console = Console(width=max(console.width, 120))
    console.print(f"[bold]{source}[/bold] ({program.source.kind}, {program.source.task}): "
                  f"{params:,} parameters, {nbytes:,} bytes", highlight=False)
    sizes = Table(title=f"parameters per module (depth {depth})", title_justify="left")
    for col, just in (("module", "left"), ("parameters", "right"), ("bytes", "right"), ("share", "right")):
        sizes.add_column(col, justify=just)
    for m in info["modules"]:
        sizes.add_row(m["module"], f"{m['parameters']:,}", f"{m['bytes']:,}", f"{m['bytes'] / max(nbytes, 1):.1%}")
    console.print(sizes)
    console.print(_attention_table(info["attention_sites"]))
    ops = Table(title=f"op histogram ({len(program.module.graph.nodes)} graph nodes)", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["op_histogram"].items():
        ops.add_row(op, str(n))
    console.print(ops)
    print_moe_layers(console, moe_rows)
    return info


def _attention_table(sites: list[dict[str, Any]]) -> Table:
    from memc.passes.attention.sites import AttentionSite

    rows = site_rows([AttentionSite(**s) for s in sites])
    table = Table(title=f"attention sites ({len(rows)})", title_justify="left", box=box.SIMPLE_HEAD)
    for col in rows[0] if rows else ("module",):
        table.add_column(col, justify="left" if col in ("module", "kind", "mask", "extras") else "right",
                         no_wrap=col == "module")
    for r in rows:
        table.add_row(*(escape("-" if v is None else str(v)) for v in r.values()))
    return table


def moe_layers(program: Program) -> list[dict[str, Any]]:
    """One row per MoE layer detect-moe finds (router, score function, k, experts, shared experts)."""
    from memc.passes.moe.detect import find_moe_sites

    return [s.row() for s in find_moe_sites(program.module)]


def print_moe_layers(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("MoE layers: none found", highlight=False)
        return
    table = Table(title=f"MoE layers ({len(rows)})", title_justify="left")
    cols = ("layer", "module", "experts", "top-k", "score", "renorm", "scale", "groups", "router bias",
            "corr. bias", "experts form", "shared", "expert bytes")
    for col in cols:
        table.add_column(col, justify="left" if col in ("module", "score", "experts form", "shared") else "right")
    for r in rows:
        table.add_row(
            str(r["layer"]), r["module"], str(r["experts"]), str(r["top_k"]), r["score"], "yes" if r["renormalize"] else "no",
            f"{r['scaling']:g}", r["groups"], "yes" if r["router_bias"] else "no", "yes" if r["correction_bias"] else "no",
            r["experts_form"], ", ".join(m.rpartition(".")[2] for m in r["shared"]) or "-", f"{r['expert_bytes']:,}",
        )
    console.print(table)


def print_passes() -> None:
    console = Console()
    passes = registered_passes()
    for name, cls in passes.items():
        console.print(f"[bold]{escape(name)}[/bold]  [dim]({escape(pass_origin(name))})[/dim]", highlight=False)
        console.print(f"  {escape(cls.summary())}", highlight=False)
        contract = [f"{k}: {', '.join(sorted(v))}" for k, v in
                    (("requires", cls.requires), ("provides", cls.provides), ("invalidates", cls.invalidates)) if v]
        if contract:
            console.print("  " + escape("; ".join(contract)), highlight=False)
        for opt, typ, default, doc in describe_fields(cls.Config):
            console.print(escape(f"    {opt}: {typ} = {default!r}  {doc}"), highlight=False)
    for err in plugin_errors():
        console.print(f"[yellow]warning:[/yellow] {escape(err)}", highlight=False)
