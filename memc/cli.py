"""The `memc` command line: compile, inspect, passes, eval, routing, generate. Errors are one clear message and a non-zero exit."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from memc.errors import MemcError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model: .pt2 archive, Hugging Face model dir, package.module:function, or .pt pickle")
    p.add_argument("--config", "-c", help="toolchain.toml (default: memc's built-in defaults)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled .pt/.pth model (runs code!)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override a config key, typed by the schema (repeatable): --set target.opset=21 --set pipeline.1.window=64",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memc", description="Compile PyTorch models into smaller, faster deployable ones.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="capture, run the pass pipeline, lower to a target and verify")
    _add_model_args(c)
    c.add_argument("--target", "-t", choices=["onnx"], help="deployment target (overrides [target] name)")
    c.add_argument("--output", "-o", help="output directory (overrides [output] dir)")
    c.add_argument("--seed", type=int, help="overrides the config's seed")
    c.add_argument("--budget", help="artifact size for the pipeline's allocate-bits pass: 1.6MB, 1.5MiB, 3bits, 0.1x")
    c.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; run nothing")
    c.add_argument("--dump-ir", action="store_true", help="write the graph after each pass to <output>/ir/")
    c.add_argument("--no-progress", action="store_true", help="no progress display")

    i = sub.add_parser("inspect", help="parameters and bytes per module, op histogram of the captured graph")
    _add_model_args(i)
    i.add_argument("--depth", type=int, default=2, help="module depth of the size table (default 2)")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")

    sub.add_parser("passes", help="list registered passes (plugins included) with their options")

    s = sub.add_parser("schema", help="print the JSON Schema of a machine-readable output (report: report.json)")
    s.add_argument("name", choices=["report"], help="report: report.json, memc.report/1")

    e = sub.add_parser("eval", help="perplexity, recall, embedding cosine, bytes and speed of a model or ONNX artifact")
    e.add_argument("model", help="anything `memc compile` accepts, or a compiled artifact (output dir or .onnx)")
    e.add_argument("--text", default="heldout:code", help="heldout:code | heldout:prose | a UTF-8 text file")
    e.add_argument("--context", type=int, default=1024, help="tokens per evaluation window (default 1024)")
    e.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    e.add_argument("--recall", action="store_true", help="run the long-range recall probe (through the model's tokenizer, or bytes)")
    e.add_argument("--recall-distances", type=_int_list, default=[16, 128, 512, 896], help="comma-separated distances in tokens")
    e.add_argument("--recall-trials", type=int, default=16)
    e.add_argument("--reference", help="encoders: compare sentence embeddings with this model")
    e.add_argument("--sentences", type=int, default=64, help="encoders: number of real sentences")
    e.add_argument("--speed", type=_int_list, default=[], metavar="CONTEXTS", help="e.g. 128,512,1024")
    e.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, for comparable numbers)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", dest="json_out", help="write the results as JSON here")
    e.add_argument("--plot", help="write PNG plots into this directory")
    e.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled .pt/.pth model (runs code!)")

    r = sub.add_parser(
        "routing", help="MoE routing consistency (SRP / SCH), expert-cache hit rates and per-text load divergence",
        description="Trace the top-k routing of every MoE layer (memc's detect-moe and moe-calibrate passes on the "
                    "captured model) over evenly spaced windows of each text, and report per layer and text: SRP "
                    "and SCH (moe-lrc, arXiv 2505.16056) by segment length; LRU, LFU and Belady (best possible) "
                    "hit rates of a cache of k, 2k, 3k, 4k expert slots per layer; the Jensen-Shannon divergence "
                    "of the expert loads between every pair of texts. Routing statistics describe the model and "
                    "fit nothing to it, so held-out text is allowed here (unlike calibration).",
    )
    r.add_argument("model", help="an MoE model `memc compile` accepts (Hugging Face dir, .pt2, package.module:function)")
    r.add_argument("--text", action="append", dest="texts", metavar="SPEC",
                   help="trainsplit:code | trainsplit:prose | heldout:code | heldout:prose | a UTF-8 file "
                        "(repeatable; default heldout:code)")
    r.add_argument("--windows", type=int, default=32, help="evenly spaced windows per text (default 32; fewer if the "
                                                            "text is short)")
    r.add_argument("--context", type=int, default=1024, help="tokens per window, capped by the model (default 1024)")
    r.add_argument("--segments", type=_int_list, default=[4, 16, 64, 256], help="SRP / SCH segment lengths in tokens "
                                                                                "(default 4,16,64,256)")
    r.add_argument("--cache", type=_int_list, default=[1, 2, 3, 4], dest="multiples", metavar="MULTIPLES",
                   help="cache slots per layer as multiples of top-k (default 1,2,3,4)")
    r.add_argument("--batch", type=int, default=1, help="windows per forward (default 1)")
    r.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    r.add_argument("--json", dest="json_out", help="write the results as JSON here")
    r.add_argument("--plot", dest="plot_dir", help="write a PNG of hit rate vs cache slots per layer into this directory")
    r.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled .pt/.pth model (runs code!)")

    g = sub.add_parser(
        "generate", help="generate text with a compiled artifact's decode graph (only the artifact directory is read)",
        description="Stream text generated by ARTIFACT's decode.onnx through its shipped tokenizer. The text goes "
                    "to stdout; the context note and the final timing line (prefill tokens/s, decode ms/token) go "
                    "to stderr.",
    )
    g.add_argument("artifact", help="a `memc compile` output directory with decode.onnx ([target] decode_graph = true) "
                                    "or an expert cache ([target] expert_cache = { slots = C }), which is preferred")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64; >= 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this mass (1 = all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--stop", nargs="+", action="extend", default=[], metavar="TEXT",
                   help="stop before any of these strings (the tokenizer's end-of-text token always stops)")
    g.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    g.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, timings, state bytes)")
    g.add_argument("--slots", type=int, default=None,
                   help="artifacts with an expert cache: experts resident per MoE layer (k..E; default: as compiled)")
    g.add_argument("--no-expert-cache", action="store_true",
                   help="run decode.onnx (every expert resident) even when the artifact has an expert cache")
    return parser


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _config(args: argparse.Namespace):
    from memc.config import load_config

    cfg = load_config(args.config)
    if getattr(args, "overrides", None):
        from memc.overrides import apply_overrides, parse_set_args

        cfg = apply_overrides(cfg, parse_set_args(args.overrides), origin="--set", from_text=True)
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    if getattr(args, "target", None):
        cfg.target.name = args.target
    if getattr(args, "dump_ir", False):
        cfg.instruments.dump_ir = True
    if getattr(args, "budget", None) is not None:
        set_budget(cfg, args.budget, args.config)
    return cfg


def set_budget(cfg, budget: str, config_path: str | None) -> None:
    """``--budget``: the budget of every allocate-bits pass in the pipeline (there must be one)."""
    from memc.errors import ConfigError

    entries = [s for s in cfg.pipeline if s.name == "allocate-bits"]
    if not entries:
        where = config_path or "the default pipeline"
        raise ConfigError(
            f"--budget: {where} has no allocate-bits pass to give the budget to",
            hint="use -c toolchains/mixed-bits.toml, or add [[pipeline]] pass = \"allocate-bits\"",
        )
    for s in entries:
        s.options["budget"] = budget


def cmd_compile(args: argparse.Namespace) -> int:
    from memc import api

    cfg = _config(args)
    source = args.model or cfg.model.source
    out_dir = Path(args.output or cfg.output.dir)
    if args.dry_run:
        plan = api.prepare(source, config=cfg, output=out_dir, trust_pickle=args.trust_pickle)
        print("memc compile --dry-run: configuration is valid; this is the plan:")
        print("\n".join(plan.describe()))
        return 0
    api.compile(source, config=cfg, output=out_dir, trust_pickle=args.trust_pickle, progress=not args.no_progress)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from memc.inspection import inspect_model

    inspect_model(args.model, _config(args), trust_pickle=args.trust_pickle, depth=args.depth, as_json=args.json)
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from memc.inspection import print_passes

    print_passes()
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from memc.report_schema import schema_text

    sys.stdout.write(schema_text(args.name))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from memc.eval.command import EvalRequest, evaluate, plot_result, print_result, save_json

    req = EvalRequest(
        source=args.model, text=args.text, context=args.context, max_windows=args.max_windows, recall=args.recall,
        recall_distances=args.recall_distances, recall_trials=args.recall_trials, reference=args.reference,
        sentences=args.sentences, speed_contexts=args.speed, threads=args.threads, seed=args.seed,
        trust_pickle=args.trust_pickle,
    )
    result = evaluate(req)
    print_result(result)
    if args.json_out:
        save_json(result, Path(args.json_out))
    if args.plot:
        for path in plot_result(result, Path(args.plot)):
            print(f"wrote {path}")
    return 0


def cmd_routing(args: argparse.Namespace) -> int:
    from memc.eval.routing_command import RoutingRequest, analyse, plot_result, print_result, save_json

    req = RoutingRequest(
        source=args.model, texts=args.texts or ["heldout:code"], windows=args.windows, context=args.context,
        segments=args.segments, multiples=args.multiples, batch=args.batch, threads=args.threads,
        trust_pickle=args.trust_pickle, json_out=args.json_out, plot_dir=args.plot_dir,
    )
    result = analyse(req, progress=lambda line: print(f"memc routing: {line}", file=sys.stderr))
    print_result(result)
    if args.json_out:
        save_json(result, Path(args.json_out))
        print(f"wrote {args.json_out}")
    if args.plot_dir:
        print(f"wrote {plot_result(result, Path(args.plot_dir))}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from memc.runtime.command import GenerateRequest, generate_command

    generate_command(GenerateRequest(
        artifact=args.artifact, prompt=args.prompt, prompt_file=args.prompt_file, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
        threads=args.threads, as_json=args.json, slots=args.slots, expert_cache=not args.no_expert_cache,
    ))
    return 0


COMMANDS = {"generate": cmd_generate, "compile": cmd_compile, "inspect": cmd_inspect, "passes": cmd_passes, "eval": cmd_eval,
            "routing": cmd_routing, "schema": cmd_schema}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return COMMANDS[args.command](args)
    except MemcError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"memc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("memc: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in memc or a library: still one readable message
        if args.debug:
            traceback.print_exc()
        print(
            f"memc: internal error: {type(exc).__name__}: {exc}\n  rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
