"""Target.verify: max |Δ| per output and per sample, and a runtime failure becomes one clear VerificationError."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memc.config import TargetConfig
from memc.errors import VerificationError
from memc.program import Program, SourceInfo
from memc.targets.base import Target


class _Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


def _program() -> Program:
    gm = torch.export.export(_Double(), (torch.ones(2, 3),)).module()
    return Program(gm, (torch.ones(2, 3),), ["x"], ["y"], {}, SourceInfo("t", "factory", ""))


class _FakeTarget(Target):
    name = "fake"

    def __init__(self, outputs):
        super().__init__(TargetConfig(atol=1e-3))
        self.outputs = outputs

    def run(self, out_dir: Path, inputs):
        if isinstance(self.outputs, Exception):
            raise self.outputs
        return self.outputs


def test_verify_reports_max_abs_diff_per_output_and_fails_beyond_atol(tmp_path):
    program = _program()
    good = _FakeTarget([np.full((2, 3), 2.0005, dtype=np.float32)]).verify(program, tmp_path, [program.example_inputs])
    assert good.passed and good.worst["y"] == pytest.approx(5e-4, rel=1e-3)
    bad = _FakeTarget([np.full((2, 3), 2.01, dtype=np.float32)]).verify(program, tmp_path, [program.example_inputs])
    assert not bad.passed and bad.worst["y"] == pytest.approx(1e-2, rel=1e-3)
    wrong_shape = _FakeTarget([np.zeros((3, 2), dtype=np.float32)]).verify(program, tmp_path, [program.example_inputs])
    assert not wrong_shape.passed and wrong_shape.worst["y"] == float("inf")


def test_runtime_failure_is_a_verification_error_naming_the_shapes(tmp_path):
    program = _program()
    target = _FakeTarget(RuntimeError("kernel rejected input\nlong backend trace"))
    with pytest.raises(VerificationError, match=r"failed to run on inputs of shapes \{'x': \[2, 3\]\}: RuntimeError: kernel rejected input") as info:
        target.verify(program, tmp_path, [program.example_inputs])
    assert "long backend trace" not in str(info.value)  # one line from the runtime, not its whole dump
