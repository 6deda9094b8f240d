"""The compile driver: validate -> capture -> passes -> target check -> build -> verify -> atomic write."""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memc.atomic import check_output_dir, staged_output_dir, write_json
from memc.calibration import calibration_samples
from memc.capture import capture, resolve_kind
from memc.capture.inputs import alternate_sizes, resized_inputs
from memc.capture.memory import InMemorySource
from memc.codegen.hf_checkpoint import HF_DIR, check_hf_checkpoint, write_hf_checkpoint
from memc.config import ToolchainConfig
from memc.errors import CaptureError, ConfigError, VerificationError
from memc.passes.base import Pass, PassContext, create_pass
from memc.passes.instruments import IRDumpInstrument, ProgressInstrument, VerifyInstrument
from memc.passes.manager import PassManager, check_order
from memc.program import Program
from memc.report import build_report, print_summary, program_facts, render_summary
from memc.targets.base import BuildResult, Target, Verification, get_target
from memc.tokenizer_files import copy_tokenizer

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.txt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Plan:
    """A validated compile plan: what ``--dry-run`` prints and ``run`` executes."""

    source: str
    kind: str
    config: ToolchainConfig
    passes: list[Pass]
    target: Target
    out_dir: Path
    trust_pickle: bool = False
    in_memory: InMemorySource | None = None  # memc.compile(nn.Module / ExportedProgram); else ``source`` is loaded

    def describe(self) -> list[str]:
        lines = [
            f"model:   {self.source} ({self.kind})",
            f"seed:    {self.config.seed}",
            f"inputs:  batch {self.config.inputs.batch}, seq_len {self.config.inputs.seq_len} "
            f"(dynamic batch: {self.config.inputs.dynamic_batch}, dynamic seq: {self.config.inputs.dynamic_seq})",
            f"passes:  {len(self.passes)}",
        ]
        for i, p in enumerate(self.passes):
            opts = ", ".join(f"{k}={v!r}" for k, v in vars(p.config).items())
            lines.append(f"  {i}. {p.name}" + (f" ({opts})" if opts else ""))
        t = self.config.target
        extras = ([", + decode.onnx"] if t.decode_graph else []) + (
            [f", + expert_cache/ ({t.expert_cache.slots} slots per MoE layer)"] if t.expert_cache.slots else [])
        lines.append(f"target:  {t.name} (opset {t.opset}, atol {t.atol:g}{''.join(extras)})")
        lines.append(f"output:  {self.out_dir}")
        return lines


def make_plan(
    source: str | InMemorySource, config: ToolchainConfig, out_dir: Path, trust_pickle: bool = False
) -> Plan:
    """Validate everything that can be validated without loading the model."""
    passes = [s.instance if s.instance is not None else create_pass(s.name, s.options, s.path) for s in config.pipeline]
    check_order(passes, set())
    if isinstance(source, InMemorySource):
        if config.model.kind != "auto":
            raise ConfigError(f"model.kind: {config.model.kind!r} does not apply to an in-memory {source.kind} source")
        kind, in_memory, source = source.kind, source, source.description
    else:
        kind, in_memory = resolve_kind(source, config.model.kind), None
    if kind == "pickle" and not trust_pickle:
        raise CaptureError(
            f"refusing to load {source}: it is a pickle, and unpickling can run arbitrary code",
            hint="if you trust where it came from, rerun with --trust-pickle (memc.compile(..., trust_pickle=True)); "
            "better, save the model with torch.export.save(...) as a .pt2 archive, which memc loads safely",
        )
    check_output_dir(out_dir)
    return Plan(source, kind, config, passes, get_target(config.target), out_dir, trust_pickle, in_memory)


@dataclass
class Compiled:
    """What ``run_plan`` produced: the report written, the program before lowering, the checks and the build."""

    report: dict[str, Any]
    program: Program
    verification: Verification
    build: BuildResult


class _Display:
    """Stage lines on stderr plus a progress bar for long loops (only on a terminal)."""

    def __init__(self, enabled: bool, quiet: bool = False):
        self.console = Console(stderr=True, quiet=quiet)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=True, disable=not (enabled and self.console.is_terminal),
        )

    def stage(self, text: str) -> None:
        self.console.print(f"[bold]memc[/bold] {text}", highlight=False, soft_wrap=True)  # one line per stage in logs

    @contextlib.contextmanager
    def task(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        task_id = self.progress.add_task(description, total=total)
        try:
            yield lambda n=1: self.progress.advance(task_id, n)
        finally:
            self.progress.remove_task(task_id)


def _verification_samples(program: Program, calib: list[tuple], config: ToolchainConfig) -> list[tuple]:
    samples = [program.example_inputs]
    if program.source.task in ("causal-lm", "encoder") and program.dynamic_dims:
        for batch, seq in config.target.verify_shapes:
            if program.source.max_seq_len is None or seq <= program.source.max_seq_len:
                samples.append(resized_inputs(program, {"batch": batch, "seq": seq}, config.seed + 100 + batch + seq))
    elif any(program.dynamic_dims.values()):
        samples.append(resized_inputs(program, alternate_sizes(program), config.seed + 100))
    return samples + calib


def run_plan(plan: Plan, progress: bool = True, quiet: bool = False) -> Compiled:
    """Execute a plan; on any failure nothing is left in the output directory. ``quiet``: print nothing."""
    cfg = plan.config
    display = _Display(progress and cfg.instruments.progress, quiet)
    seed_everything(cfg.seed)
    with display.progress:
        t0 = time.perf_counter()
        display.stage(f"capturing {plan.source} ({plan.kind}) with torch.export")
        if plan.in_memory is not None:
            program = plan.in_memory.capture(cfg)
        else:
            program = capture(plan.source, cfg, trust_pickle=plan.trust_pickle)
        capture_seconds = time.perf_counter() - t0
        captured = {**program_facts(program), "op_histogram": program.op_histogram()}
        calib = calibration_samples(program, cfg.calibration, cfg.inputs, cfg.seed)
        ctx = PassContext(seed=cfg.seed, calibration=calib, config=cfg, progress_factory=display.task)

        with staged_output_dir(plan.out_dir) as stage:
            instruments: list = []
            if cfg.instruments.verify_each_pass:
                instruments.append(VerifyInstrument(program.example_inputs, cfg.instruments.pass_atol))
            if cfg.instruments.dump_ir:
                dumper = IRDumpInstrument(stage / "ir")
                dumper.dump(program, "capture")
                instruments.append(dumper)
            if plan.passes:
                display.stage(f"running {len(plan.passes)} pass(es)")
                with display.task(len(plan.passes), "passes") as advance:
                    instruments.append(ProgressInstrument(advance))
                    program = PassManager(plan.passes, instruments).run(program, ctx)

            if cfg.output.hf_checkpoint:
                check_hf_checkpoint(program)  # before the long lowering
            display.stage(f"lowering to {plan.target.name} (checking every op first)")
            t1 = time.perf_counter()
            plan.target.check(program)
            build = plan.target.build(program, stage)
            build_seconds = time.perf_counter() - t1

            samples = _verification_samples(program, calib, cfg)
            display.stage(f"verifying against the torch program on {len(samples)} sample(s)")
            verification = plan.target.verify(program, stage, samples)
            report = build_report(
                config=cfg, captured=captured, program=program, capture_seconds=capture_seconds,
                target_name=plan.target.name, build=build, build_seconds=build_seconds, verification=verification,
            )
            if not verification.passed:
                print_summary(display.console, report)
                worst = {k: f"{v:.3g}" for k, v in verification.worst.items() if v > verification.atol}
                greedy = (verification.decode or {}).get("greedy")
                if not worst and greedy and not greedy["equal"]:
                    raise VerificationError(
                        f"the decode graph's greedy tokens differ from the torch program's at new token "
                        f"{greedy['first_mismatch']} of {greedy['steps']}; nothing was written to {plan.out_dir}"
                    )
                raise VerificationError(
                    f"the {plan.target.name} artifact does not match the torch program: max |Δ| {worst} "
                    f"> atol {verification.atol:g}; nothing was written to {plan.out_dir}"
                )
            if cfg.output.hf_checkpoint:
                display.stage("writing the Hugging Face checkpoint (hf/) and checking it against the program")
                report["hf_checkpoint"] = write_hf_checkpoint(program, stage, cfg.target.atol)
            source_dir = Path(program.source.path) if program.source.kind == "hf" else None
            report["tokenizer_files"] = copy_tokenizer(source_dir, stage)  # the artifact reads text on its own
            write_json(stage / REPORT_FILE, report)
            (stage / SUMMARY_FILE).write_text(render_summary(report), encoding="utf-8")
    print_summary(display.console, report)
    written = [a.path for a in build.artifacts] + [REPORT_FILE, SUMMARY_FILE] + report["tokenizer_files"]
    written += [f"{HF_DIR}/"] if "hf_checkpoint" in report else []
    display.stage(f"wrote {plan.out_dir}/ ({', '.join(written)})")
    return Compiled(report, program, verification, build)
