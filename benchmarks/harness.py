"""The shared benchmark runner: every case runs in a fresh process (so peak RSS is its own), on one thread,
with a warm-up and the median of N repeats; ratios are computed between cases of the same run.

A case is a function ``case(**params) -> dict`` importable by name (``module:function``); it does its own set-up,
then returns measurements. The runner adds ``peak_rss_mb`` read in the child after the case finished.
"""
from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import pickle
import platform
import queue as queue_module
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memc.eval.speed import median_seconds  # noqa: F401  (re-exported: one timing rule for eval and benchmarks)

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process's own address space, in MiB.

    Linux keeps ``ru_maxrss`` across ``execve``, so a spawned child's ``ru_maxrss`` is at least its parent's RSS at
    spawn time (a parent holding torch makes every case look ~300 MB heavier). ``VmHWM`` belongs to the address
    space and starts afresh at exec; ``ru_maxrss`` is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(target: str, params: dict[str, Any], queue: "mp.Queue") -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        module, func = target.split(":")
        result = getattr(importlib.import_module(module), func)(**params)
        result["peak_rss_mb"] = peak_rss_mb()
        pickle.dumps(result)  # Queue.put pickles in a feeder thread that would only print the error
        queue.put(("ok", result))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_case(target: str, **params: Any) -> dict[str, Any]:
    """Run one case in a fresh spawned process and return its measurements.

    A child that dies without reporting (a crash, the OOM killer, ``os._exit``) raises RuntimeError instead of
    leaving the parent waiting forever.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, params, queue))
    proc.start()
    try:
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if proc.is_alive():
                    continue
                try:  # it may have reported just before exiting
                    status, payload = queue.get(timeout=1.0)
                    break
                except queue_module.Empty:
                    raise RuntimeError(
                        f"benchmark case {target} died without reporting a result (exit code {proc.exitcode}"
                        + (f", signal {-proc.exitcode}" if (proc.exitcode or 0) < 0 else "") + ")"
                    ) from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark case {target} failed: {payload}")
    return payload


@dataclass
class Table:
    """A Markdown table plus the raw rows, written side by side as results/NAME.md and NAME.json."""

    name: str
    command: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns) + "\n"
        body = "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in self.rows)
        notes = "".join(f"\n{n}" for n in self.notes)
        return f"`{self.command}`\n\n{head}{body}{notes}\n"

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        md = RESULTS / f"{self.name}.md"
        md.write_text(self.markdown(), encoding="utf-8")
        env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "cpu": cpu_info()}
        payload = {"command": self.command, "columns": self.columns, "rows": self.rows, "raw": self.raw, "env": env}
        (RESULTS / f"{self.name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        return md

    def publish(self) -> Path:
        """Write results/NAME.{md,json} and print the table and where it went: how every benchmark ends."""
        path = self.write()
        print(self.markdown())
        print(f"wrote {path}")
        return path


def ort_session(path: str | Path, profile: str | None = None, optimized: str | None = None):
    """One-thread onnxruntime CPU session, quiet; optionally profiling (file prefix) or saving the optimized graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cpu_info() -> str:
    """``model name (ISA: AVX2, AVX-512, AMX)``: ratios between runtimes depend on both, so every table says them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown CPU")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'})"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
