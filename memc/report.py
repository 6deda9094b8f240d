"""report.json (what every stage and pass did) and the readable summary table printed after a compile."""
from __future__ import annotations

import dataclasses
import io
import json
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from memc.program import PassRecord, Program, SourceInfo
from memc.report_schema import REPORT_SCHEMA_ID
from memc.schema import to_dict
from memc.targets.base import Artifact, BuildResult, SampleCheck, Verification


def environment() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import memc

    return {
        "memc": memc.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def program_facts(program: Program) -> dict[str, Any]:
    params, nbytes = program.parameter_stats()
    buffers, buffer_bytes = program.buffer_stats()
    return {
        "parameters": params,
        "parameter_bytes": nbytes,
        "buffers": buffers,
        "buffer_bytes": buffer_bytes,
        "graph_nodes": len(program.module.graph.nodes),
        "inputs": {
            name: {
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "dynamic": {str(a): dataclasses.asdict(d) for a, d in program.dynamic_dims.get(name, {}).items()},
            }
            for name, t in zip(program.input_names, program.example_inputs)
        },
        "outputs": program.output_names,
    }


def verification_dict(v: Verification) -> dict[str, Any]:
    return {
        "atol": v.atol,
        "passed": v.passed,
        "max_abs_diff": v.worst,
        "samples": [dataclasses.asdict(s) for s in v.samples],
        **({"decode": v.decode} if v.decode is not None else {}),
    }


def build_report(
    *,
    config: Any,
    captured: dict[str, Any],
    program: Program,
    capture_seconds: float,
    target_name: str,
    build: BuildResult,
    build_seconds: float,
    verification: Verification,
) -> dict[str, Any]:
    cfg = to_dict(config)
    cfg["pipeline"] = [{"pass": s.name, **s.options} for s in config.pipeline]
    return {
        "schema": REPORT_SCHEMA_ID,
        "source": dataclasses.asdict(program.source),
        "seed": config.seed,
        "config": cfg,
        "capture": {"seconds": round(capture_seconds, 3), **captured},
        "passes": [dataclasses.asdict(r) for r in program.log],
        "compiled": program_facts(program),
        "target": {
            "name": target_name,
            "seconds": round(build_seconds, 3),
            "artifacts": [dataclasses.asdict(a) for a in build.artifacts],
            **build.metrics,
        },
        "verification": verification_dict(verification),
        "environment": environment(),
    }


def _typed(cls: type, data: dict[str, Any]) -> Any:
    """``cls(**data)`` keeping only cls's fields (a report from a later memc may carry more keys)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


class Report(dict):
    """report.json: the dict (``report["verification"]["max_abs_diff"]``, ``json.dumps(report)``) with typed views
    of what build scripts gate on (``report.verification.passed``, ``report.passes[0].metrics``)."""

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read ``<artifact>/report.json`` (or the file itself)."""
        path = Path(path)
        return cls(json.loads((path / "report.json" if path.is_dir() else path).read_text(encoding="utf-8")))

    @property
    def schema(self) -> str:
        return self.get("schema", "")

    @property
    def source(self) -> SourceInfo:
        return _typed(SourceInfo, self["source"])

    @property
    def passes(self) -> list[PassRecord]:
        return [_typed(PassRecord, r) for r in self["passes"]]

    @property
    def artifacts(self) -> list[Artifact]:
        return [_typed(Artifact, a) for a in self["target"]["artifacts"]]

    @property
    def verification(self) -> Verification:
        v = self["verification"]
        return Verification(v["atol"], [_typed(SampleCheck, s) for s in v["samples"]])

    @property
    def passed(self) -> bool:
        return bool(self["verification"]["passed"])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def summary_tables(report: dict[str, Any]) -> list[Table]:
    stages = Table(title=f"memc compile: {report['source']['path']}", title_justify="left")
    for col in ("stage", "seconds", "changed", "details"):
        stages.add_column(col)
    cap = report["capture"]
    stages.add_row(
        f"capture ({report['source']['kind']})",
        f"{cap['seconds']:.2f}",
        "",
        f"{cap['parameters']:,} params, {_fmt_bytes(cap['parameter_bytes'])}, {cap['graph_nodes']} nodes",
    )
    for rec in report["passes"]:
        details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec["metrics"].items())
        stages.add_row(f"pass {rec['name']}", f"{rec['seconds']:.2f}", "yes" if rec["changed"] else "no", details)
    tgt = report["target"]
    arts = ", ".join(f"{a['path']} {_fmt_bytes(a['bytes'])}" for a in tgt["artifacts"])
    stages.add_row(f"build ({tgt['name']})", f"{tgt['seconds']:.2f}", "", f"{arts}, {tgt.get('nodes', '?')} nodes")

    ver = report["verification"]
    checks = Table(title="verification vs the torch program", title_justify="left")
    for col in ("output", "max |Δ|", "tolerance", "result"):
        checks.add_column(col)
    for name, diff in ver["max_abs_diff"].items():
        checks.add_row(name, f"{diff:.3g}", f"{ver['atol']:.1g}", "ok" if diff <= ver["atol"] else "FAIL")
    greedy = (ver.get("decode") or {}).get("greedy")
    if greedy:
        if "max_abs_diff" in greedy:
            checks.add_row(f"decode: prefill {greedy['prompt']} + {greedy['steps']} steps", f"{greedy['max_abs_diff']:.3g}",
                           f"{ver['atol']:.1g}", "ok" if greedy["max_abs_diff"] <= ver["atol"] else "FAIL")
        agree = greedy["steps"] if greedy["equal"] else greedy["first_mismatch"]
        checks.add_row(f"decode: greedy tokens = torch program's ({greedy['steps']} new)",
                       f"{agree}/{greedy['steps']}" + ("" if greedy["equal"] else " before the 1st mismatch"),
                       "all", "ok" if greedy["equal"] else "FAIL")
    return [stages, checks]


def print_summary(console: Console, report: dict[str, Any]) -> None:
    for table in summary_tables(report):
        console.print(table)
    n = len(report["verification"]["samples"])
    console.print(f"verified on {n} sample(s): " + ("PASSED" if report["verification"]["passed"] else "FAILED"))


def render_summary(report: dict[str, Any], width: int = 120) -> str:
    """The summary as plain text (summary.txt)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    print_summary(console, report)
    return console.export_text()
