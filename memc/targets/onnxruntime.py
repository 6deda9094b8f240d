"""The onnx target: an ONNX model (dynamo exporter) executed and verified with onnxruntime on the CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from memc.codegen.onnx import check_exportable, export_onnx
from memc.errors import CaptureError
from memc.program import Program
from memc.targets.session import create_session
from memc.targets.base import Artifact, BuildResult, Target, register_target

MODEL_FILE = "model.onnx"


@register_target
class OnnxRuntimeTarget(Target):
    name = "onnx"

    def __init__(self, config):
        super().__init__(config)
        self._ep: torch.export.ExportedProgram | None = None
        self._session: ort.InferenceSession | None = None

    def _exported(self, program: Program) -> torch.export.ExportedProgram:
        if self._ep is None:
            try:
                self._ep = program.export()
            except Exception as exc:
                raise CaptureError(f"re-exporting the rewritten program failed: {type(exc).__name__}: {exc}") from None
        return self._ep

    def check(self, program: Program) -> None:
        check_exportable(self._exported(program), self.config.opset)

    def build(self, program: Program, out_dir: Path) -> BuildResult:
        model = export_onnx(
            program, self._exported(program), self.config.opset, self.config.optimize, self.config.debug_metadata
        )
        path = out_dir / MODEL_FILE
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        ops: dict[str, int] = {}
        for node in model.graph.node:
            key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            ops[key] = ops.get(key, 0) + 1
        metrics = {"opset": self.config.opset, "nodes": len(model.graph.node), "op_histogram": dict(sorted(ops.items()))}
        return BuildResult([Artifact(MODEL_FILE, path.stat().st_size, "onnx model")], metrics)

    def run(self, out_dir: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        if self._session is None:
            self._session = create_session(out_dir / MODEL_FILE)
        feeds = {i.name: t.numpy() for i, t in zip(self._session.get_inputs(), inputs)}
        return self._session.run(None, feeds)
