"""OnnxRuntimeTarget: one target instance reused for another program or output directory answers for that one."""
from __future__ import annotations

import numpy as np
import torch

from memc.config import TargetConfig
from memc.program import Program, SourceInfo
from memc.targets.onnxruntime import OnnxRuntimeTarget


class _Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _program(factor: float) -> Program:
    x = torch.ones(2, 3)
    gm = torch.export.export(_Scale(factor), (x,)).module()
    return Program(gm, (x,), ["x"], ["y"], {}, SourceInfo("t", "factory", ""))


def test_a_reused_target_exports_and_runs_each_program_it_is_given(tmp_path):
    target = OnnxRuntimeTarget(TargetConfig())
    for factor in (2.0, 3.0):
        program = _program(factor)
        out = tmp_path / f"x{factor:g}"
        out.mkdir()
        target.check(program)
        target.build(program, out)
        (y,) = target.run(out, program.example_inputs)
        np.testing.assert_allclose(y, np.full((2, 3), factor, dtype=np.float32))
        assert target.verify(program, out, [program.example_inputs]).passed
