"""Routing consistency and expert-cache hit rates of an MoE model: `memc routing` run and rendered as Markdown.

    python -m benchmarks.routing run                       # ref-moe, held-out + train code / prose, 64 windows
    python -m benchmarks.routing run --model models/NEW --name new_moe --text heldout:code --text ...
    python -m benchmarks.routing table --name ref_moe      # re-render results/routing_ref_moe.md from its JSON

`run` is exactly `memc routing MODEL --text ... --json benchmarks/results/routing_NAME.json --plot
benchmarks/results` (one thread; the JSON records that command line), then `table`, which renders the Markdown and
the PNG (results/routing_NAME.png) from the JSON. Any MoE model memc captures works (the domain-diverse model
of issue 11 too): the texts are the command's (trainsplit:/heldout: corpora or UTF-8 files).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.harness import RESULTS, cpu_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXTS = ["heldout:code", "heldout:prose", "trainsplit:code", "trainsplit:prose"]
# moe.md, "Routing consistency and expert caching": an earlier measurement on a Qwen3-MoE (E=16, k=2), mean LRU /
# Belady hit rate at k, 2k, 3k, 4k slots
MOE_MD = {1: (0.39, 0.43), 2: (0.64, 0.77), 3: (0.82, 0.90), 4: (0.93, 0.96)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def markdown(result: dict, cmd: str) -> str:
    layers, texts = result["layers"], [t["text"] for t in result["texts"]]
    segs = [str(m) for m in result["segments"]]
    mults = result["cache_multiples_of_top_k"]
    out = [f"# Routing consistency and expert caching: {Path(result['source']).name}", "", f"`{cmd}`", ""]
    sample = "; ".join(f"{t['text']} {t['windows']} windows x {t['tokens_per_window']} = {t['tokens']:,} tokens"
                       for t in result["texts"])
    out += [f"Tokens ({result['tokenizer']}): {sample} (evenly spaced windows, an unselected sample). "
            f"{result['accounting']}. Traced by detect-moe + moe-calibrate's collect on the captured graph; "
            f"{result['seconds']} s in all, 1 thread. CPU: {cpu_info()}, shared with other jobs.", ""]

    def block(title: str, cols: list[str], cell) -> None:
        out.extend([f"## {title}", "", "| layer | text | " + " | ".join(cols) + " |",
                    "|---|---|" + "---|" * len(cols)])
        for text in texts:
            for entry in layers + [None]:
                rows = layers if entry is None else [entry]
                name = "mean" if entry is None else f"{entry['layer']} ({entry['experts']} experts, top-{entry['top_k']})"
                out.append(f"| {name} | {text} | " + " | ".join(cell(rows, text, c) for c in range(len(cols))) + " |")
        out.append("")

    def srp_cell(rows, text, i):
        vals = [e["texts"][text]["srp"][segs[i]]["f1"] for e in rows if segs[i] in e["texts"][text]["srp"]]
        return f"{_mean(vals):.3f}" if vals else "-"

    at = mults.index(2) if 2 in mults else 0

    def sch_cell(rows, text, i):
        vals = [e["texts"][text]["sch"][segs[i]][str(e["slots"][at])] for e in rows if segs[i] in e["texts"][text]["sch"]]
        return f"{_mean(vals):.3f}" if vals else "-"

    def cache_cell(rows, text, i):
        return " / ".join(f"{_mean([e['texts'][text]['cache'][p][str(e['slots'][i])] for e in rows]):.3f}"
                          for p in ("lru", "lfu", "belady"))

    block("SRP (segment routing best F1) by segment length m", [f"m={m}" for m in segs], srp_cell)
    block(f"SCH (segment cache best hit rate) at {mults[at]}k slots by segment length m", [f"m={m}" for m in segs],
          sch_cell)
    block("Expert-cache hit rate LRU / LFU / Belady (best possible) by slots per layer", [f"{m}k" for m in mults],
          cache_cell)
    if len(texts) > 1:
        out += ["## Expert-load divergence between texts (Jensen-Shannon, bits)", "",
                "| texts | " + " | ".join(f"layer {e['layer']}" for e in layers) + " |",
                "|---|" + "---|" * len(layers)]
        for i, pair in enumerate(layers[0]["load_jsd_bits"]):
            out.append(f"| {pair['a']} vs {pair['b']} | "
                       + " | ".join(f"{e['load_jsd_bits'][i]['bits']:.4f}" for e in layers) + " |")
        out.append("")
    out += ["## Next to moe.md's earlier LRU / Belady numbers (E=16, k=2)", "",
            "| slots | moe.md LRU / Belady | here LRU / Belady (mean over layers and texts) |", "|---|---|---|"]
    for i, m in enumerate(mults):
        if m in MOE_MD:
            lru = _mean([e["texts"][t]["cache"]["lru"][str(e["slots"][i])] for e in layers for t in texts])
            bel = _mean([e["texts"][t]["cache"]["belady"][str(e["slots"][i])] for e in layers for t in texts])
            out.append(f"| {m}k | {MOE_MD[m][0]:.2f} / {MOE_MD[m][1]:.2f} | {lru:.3f} / {bel:.3f} |")
    out.append("")
    return "\n".join(out)


def table(name: str) -> Path:
    """results/routing_NAME.md and .png, both rendered from results/routing_NAME.json."""
    from memc.eval.routing_command import plot_result

    result = json.loads((RESULTS / f"routing_{name}.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        plot_result(result, Path(tmp)).replace(RESULTS / f"routing_{name}.png")
    md = RESULTS / f"routing_{name}.md"
    md.write_text(markdown(result, result["command"]) + f"\nPlot (hit rate vs slots per layer): routing_{name}.png\n",
                  encoding="utf-8")
    return md


def run(model: str, name: str, texts: list[str], windows: int, context: int, batch: int) -> Path:
    """`memc routing` into results/ (paths relative to the repository root, which the command line records)."""
    from memc.cli import main

    os.chdir(ROOT)
    results = RESULTS.relative_to(ROOT)
    results.mkdir(parents=True, exist_ok=True)
    argv = ["routing", model, *[a for t in texts for a in ("--text", t)], "--windows", str(windows),
            "--context", str(context), "--batch", str(batch), "--threads", "1",
            "--json", str(results / f"routing_{name}.json"), "--plot", str(results)]
    if main(argv) != 0:
        raise SystemExit("memc routing failed")
    (results / f"{Path(model).name}_routing.png").unlink()  # the same plot, re-rendered from the JSON by table()
    return table(name)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="models/ref-moe")
    r.add_argument("--name", default="ref_moe", help="results/routing_NAME.{md,json,png}")
    r.add_argument("--text", action="append", dest="texts", help=f"default: {' '.join(DEFAULT_TEXTS)}")
    r.add_argument("--windows", type=int, default=64)
    r.add_argument("--context", type=int, default=1024)
    r.add_argument("--batch", type=int, default=2)
    t = sub.add_parser("table")
    t.add_argument("--name", default="ref_moe")
    args = parser.parse_args()
    if args.cmd == "run":
        print(run(args.model, args.name, args.texts or DEFAULT_TEXTS, args.windows, args.context, args.batch))
    else:
        print(table(args.name))


if __name__ == "__main__":
    main()
