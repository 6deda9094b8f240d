"""memc's Python API: ``memc.compile`` (what ``memc compile`` runs) for build scripts and release pipelines.

``memc compile`` is a thin layer over :func:`compile`: the same source, config and overrides give byte-identical
artifacts either way. Errors are the CLI's MemcError subclasses with the same messages, raised before anything is
written (outputs are atomic: a failure leaves nothing behind).
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from memc.capture.memory import DynamicAxes, InMemorySource, exported_source, module_source
from memc.compiler import Plan, make_plan, run_plan
from memc.config import ToolchainConfig, load_config, parse_config
from memc.errors import ConfigError
from memc.overrides import apply_overrides
from memc.program import PassRecord, Program
from memc.report import Report
from memc.targets.base import Verification

Source = str | os.PathLike | torch.nn.Module | torch.export.ExportedProgram
ConfigLike = str | os.PathLike | Mapping[str, Any] | ToolchainConfig | None


@dataclass
class CompileResult:
    """What a compile produced, for a script to gate on or keep working with.

    ``report`` is report.json (a dict with typed views, see memc.report.Report); ``verification`` the artifact vs
    the torch program on every sample; ``program`` the Program after the passes, before lowering (torch).
    """

    out_dir: Path
    report: Report
    verification: Verification
    program: Program

    @property
    def passed(self) -> bool:
        return self.verification.passed

    @property
    def max_abs_diff(self) -> dict[str, float]:
        """Output name -> worst max |Δ| over all verification samples."""
        return self.verification.worst

    @property
    def passes(self) -> list[PassRecord]:
        return list(self.program.log)

    @property
    def artifacts(self) -> dict[str, Path]:
        """Artifact file name -> its path (model.onnx, decode.onnx, ...)."""
        return {a.path: self.out_dir / a.path for a in self.report.artifacts}


def resolve_config(config: ConfigLike, overrides: Mapping[str, Any] | None = None, *,
                   origin: str = "override", from_text: bool = False) -> ToolchainConfig:
    """A path to toolchain.toml, a dict in its shape (pipeline entries may be Pass instances), a ToolchainConfig,
    or None (the defaults); then ``overrides`` (``{"target.opset": 21, "pipeline.1.window": 64}``)."""
    if config is None:
        cfg = ToolchainConfig()
    elif isinstance(config, ToolchainConfig):
        cfg = config
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(config)
    elif isinstance(config, Mapping):
        cfg = parse_config(dict(config), "config dict")
    else:
        raise ConfigError(
            f"config: expected a toolchain.toml path, a dict or a memc.config.ToolchainConfig, got {type(config).__name__}"
        )
    if overrides is not None:
        cfg = apply_overrides(cfg, overrides, origin=origin, from_text=from_text)
    return cfg


def _source(source: Any, cfg: ToolchainConfig, example_inputs: Any, dynamic_axes: DynamicAxes | None) -> str | InMemorySource:
    if isinstance(source, torch.export.ExportedProgram):
        return exported_source(source, example_inputs, dynamic_axes, cfg)
    if isinstance(source, torch.nn.Module):
        return module_source(source, example_inputs, dynamic_axes, cfg)
    if isinstance(source, (str, os.PathLike)):
        for name, value in (("example_inputs", example_inputs), ("dynamic_axes", dynamic_axes)):
            if value is not None:
                raise ConfigError(
                    f"{name}= is for in-memory sources (nn.Module, ExportedProgram); {os.fspath(source)!r} is loaded "
                    "from disk, its inputs come from the model or [[inputs.tensors]] in the config"
                )
        return os.fspath(source) or cfg.model.source
    raise ConfigError(
        f"source: expected a model path (.pt2, Hugging Face directory, .pt pickle), a factory "
        f"'package.module:function', an nn.Module or a torch.export.ExportedProgram; got {type(source).__name__}"
    )


@contextlib.contextmanager
def _callers_rng_kept():
    """A compile seeds random / numpy / torch for determinism; the calling script's generators continue unaffected."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def prepare(
    source: Source,
    *,
    config: ConfigLike = None,
    output: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    example_inputs: Any = None,
    dynamic_axes: DynamicAxes | None = None,
) -> Plan:
    """Validate everything that can be checked without loading the model; ``plan.describe()`` is ``--dry-run``."""
    cfg = resolve_config(config, overrides)
    src = _source(source, cfg, example_inputs, dynamic_axes)
    out_dir = Path(output) if output is not None else Path(cfg.output.dir)
    return make_plan(src, cfg, out_dir, trust_pickle=trust_pickle)


def compile(  # noqa: A001  (memc.compile, like torch.compile)
    source: Source,
    *,
    config: ConfigLike = None,
    output: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    example_inputs: Any = None,
    dynamic_axes: DynamicAxes | None = None,
    progress: bool = False,
    quiet: bool = False,
) -> CompileResult:
    """Capture ``source``, run the config's pass pipeline, lower to the target, verify, write ``output`` atomically.

    ``source``: anything ``memc compile`` accepts (a path or ``package.module:function``), an ``nn.Module`` with
    ``example_inputs`` (a tensor or tuple of tensors; every axis may stay dynamic, or ``dynamic_axes={"x": {0:
    "batch"}}`` names the dynamic ones), or a ``torch.export.ExportedProgram``. ``config``: a toolchain.toml path, a
    dict of the same shape (its ``pipeline`` may hold Pass instances, registered or not), or a ToolchainConfig.
    ``output`` defaults to ``[output] dir``. ``progress`` shows a progress bar on a terminal; ``quiet`` prints
    nothing (otherwise the stage lines and summary go to stderr, as with the CLI). The config's seed drives the
    compile; the caller's random / numpy / torch generator states are restored afterwards.
    """
    plan = prepare(
        source, config=config, output=output, overrides=overrides, trust_pickle=trust_pickle,
        example_inputs=example_inputs, dynamic_axes=dynamic_axes,
    )
    with _callers_rng_kept():
        done = run_plan(plan, progress=progress, quiet=quiet)
    return CompileResult(plan.out_dir, Report(done.report), done.verification, done.program)
