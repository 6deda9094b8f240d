"""Distill ref-llama's memory-caching form once and commit the small result (layer weights + metrics).

``python -m memc.reference.memory_caching --variant gated --out models/ref-llama-mc/gated`` runs the passes of
``toolchains/memory-caching-gated.toml`` (``--toolchain`` another, e.g. toolchains/memory-caching.toml for the
select layers; detect-attention -> memory-caching -> distill-attention, options overridable here) on the committed model and writes ``layers.safetensors`` (only the new layers' parameters, with their options
as metadata) and ``metrics.json`` (the distillation report). Compiles and benchmarks then load the weights with
the memory-caching pass's ``weights`` option instead of distilling again. ``--recall-text BYTES`` distils on train
code with planted key -> value lines (memc.reference.recall_text), for the recall model.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from memc.atomic import staged_output_dir, write_json
from memc.capture import capture
from memc.compiler import seed_everything
from memc.config import load_config
from memc.passes.attention.memory_caching import MC_SITES_KEY, layer_options, save_layer_weights
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from memc.reference import recall_text

TOOLCHAIN = Path(__file__).resolve().parents[2] / "toolchains" / "memory-caching-gated.toml"
WEIGHTS = "layers.safetensors"


def distill(model: str, out: Path, overrides: dict[str, dict], toolchain: Path = TOOLCHAIN, seed: int | None = None,
            notes: dict | None = None) -> dict:
    cfg = load_config(str(toolchain))
    if seed is not None:  # a continued run draws other training windows than the run it continues
        cfg.seed = seed
    seed_everything(cfg.seed)
    torch.set_num_threads(1)
    specs = [s for s in cfg.pipeline if s.name in ("detect-attention", "memory-caching", "distill-attention")]
    passes = [create_pass(s.name, {**s.options, **overrides.get(s.name, {})}, s.path) for s in specs]
    program = capture(model, cfg)
    started = time.perf_counter()
    program = PassManager(passes).run(program, PassContext(seed=cfg.seed, config=cfg))
    mc = next(p for p in passes if p.name == "memory-caching")
    report = {
        "command": "python -m memc.reference.memory_caching " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": model, "seconds": round(time.perf_counter() - started, 1), "layer": layer_options(mc.config),
        "passes": [{"name": r.name, "options": r.options, "seconds": round(r.seconds, 1), "metrics": r.metrics}
                   for r in program.log],
        **(notes or {}),
    }
    with staged_output_dir(out) as stage:
        save_layer_weights(stage / WEIGHTS, program.module, program.annotations[MC_SITES_KEY], report["layer"])
        write_json(stage / "metrics.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--toolchain", type=Path, default=TOOLCHAIN)
    ap.add_argument("--seed", type=int, help="overrides the toolchain's seed")
    ap.add_argument("--variant", choices=["residual", "gated", "soup", "sparse", "select"])
    ap.add_argument("--set", action="append", default=[], metavar="PASS.OPTION=VALUE",
                    help="override a pass option, e.g. distill-attention.steps=300 (value parsed as JSON if it can be)")
    ap.add_argument("--recall-text", type=int, metavar="BYTES",
                    help="distil on the first BYTES of train code with planted key -> value lines "
                         "(memc.reference.recall_text; for the recall model) instead of the toolchain's text")
    ap.add_argument("--recall-every", type=int, default=300, metavar="BYTES",
                    help="with --recall-text: plant a pair about every BYTES bytes of filler")
    args = ap.parse_args(argv)
    overrides: dict[str, dict] = {}
    if args.variant:
        overrides.setdefault("memory-caching", {})["variant"] = args.variant
    for item in args.set:
        key, _, raw = item.partition("=")
        name, _, opt = key.rpartition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(name, {})[opt] = value
    with tempfile.TemporaryDirectory() as tmp:
        notes = {}
        if args.recall_text:
            text = Path(tmp) / "recall-train.txt"
            notes["recall_text"] = recall_text.write(text, args.recall_text, every=args.recall_every)
            overrides.setdefault("distill-attention", {})["text"] = str(text)
        report = distill(args.model, args.out, overrides, args.toolchain, args.seed, notes)
    distilled = report["passes"][-1]["metrics"]
    for target, after in distilled.get("layer_error_after", {}).items():
        before = distilled["layer_error_before"][target]
        print(f"{target}: error {before['error']:.4f} -> {after['error']:.4f} (window only {after['window_only_error']:.4f})")
    print(f"wrote {args.out} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
