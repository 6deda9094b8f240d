"""Targets: where a compiled program runs. A target checks what it can express *before* anything is written,
builds its artifacts into a (staging) directory, and verifies them against the torch program."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from memc.config import TargetConfig
from memc.errors import VerificationError, first_line
from memc.program import Program


@dataclass
class Artifact:
    path: str  # relative to the output directory
    bytes: int
    role: str


@dataclass
class BuildResult:
    artifacts: list[Artifact]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleCheck:
    """One verification sample: its input shapes and max |Δ| per output, and how the artifact was run on it."""

    shapes: dict[str, list[int]]
    max_abs_diff: dict[str, float]
    mode: str = "forward"  # or e.g. "decode: prefill 16 + 16 steps" for the stateful decode graph


@dataclass
class Verification:
    atol: float
    samples: list[SampleCheck]
    decode: dict | None = None  # decode-graph checks beyond max |Δ|: {"greedy": {..., "equal": bool}}

    @property
    def worst(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.samples:
            for name, d in s.max_abs_diff.items():
                out[name] = max(out.get(name, 0.0), d)
        return out

    @property
    def passed(self) -> bool:
        greedy = (self.decode or {}).get("greedy")
        return all(d <= self.atol for d in self.worst.values()) and (greedy is None or greedy["equal"])


def max_abs_diff(reference: torch.Tensor, actual: np.ndarray) -> float:
    ref = reference.detach().to(torch.float64).numpy() if reference.is_floating_point() else reference.numpy()
    if ref.shape != actual.shape:
        return math.inf
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ref.astype(np.float64) - actual.astype(np.float64))))


class Target:
    """Subclasses set ``name`` and implement ``check`` (raise UnsupportedError), ``build`` and ``run``."""

    name: ClassVar[str]

    def __init__(self, config: TargetConfig):
        self.config = config

    def check(self, program: Program) -> None:
        raise NotImplementedError

    def build(self, program: Program, out_dir: Path) -> BuildResult:
        raise NotImplementedError

    def run(self, out_dir: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        raise NotImplementedError

    def verify(self, program: Program, out_dir: Path, samples: list[tuple[torch.Tensor, ...]]) -> Verification:
        """Run the built artifact and the torch program on each sample; max |Δ| per output."""
        checks = []
        for inputs in samples:
            shapes = {n: list(t.shape) for n, t in zip(program.input_names, inputs)}
            expected = program(*inputs)
            try:
                actual = self.run(out_dir, inputs)
            except Exception as exc:
                raise VerificationError(
                    f"the {self.name} artifact failed to run on inputs of shapes {shapes}: {first_line(exc)}",
                    hint="the lowering produced a graph the runtime rejects for these shapes; try another opset",
                ) from None
            diffs = {
                name: max_abs_diff(ref, got) for name, ref, got in zip(program.output_names, expected, actual)
            }
            checks.append(SampleCheck(shapes, diffs))
        return Verification(self.config.atol, checks)


TARGETS: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    TARGETS[cls.name] = cls
    return cls


def get_target(config: TargetConfig) -> Target:
    import memc.targets.onnxruntime  # noqa: F401  (registers the onnx target)

    return TARGETS[config.name](config)
