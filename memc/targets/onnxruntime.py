"""The onnx target: an ONNX model (dynamo exporter) executed and verified with onnxruntime on the CPU.

With ``[target] decode_graph = true`` (causal LMs) it also writes ``decode.onnx``, the stateful decode form of the
program after its passes (memc.codegen.decode), and verifies it as prefill + single-token steps through
memc.runtime.DecodeEngine against the program's full-sequence logits (``decode.logits`` samples in the report) and,
along the torch program's greedy path, as prefill + ``decode_steps`` steps of logits and as many greedy tokens
(``verification.decode.greedy``; its logits are one more ``decode.logits`` sample).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from memc.codegen.onnx import check_exportable, export_onnx
from memc.errors import CaptureError, VerificationError, first_line
from memc.program import Program
from memc.quant.check import check_quant_formats
from memc.runtime.engine import DECODE_FILE
from memc.targets.session import SESSION_CONFIG, create_session
from memc.targets.base import Artifact, BuildResult, SampleCheck, Target, Verification, register_target

MODEL_FILE = "model.onnx"
DECODE_OUTPUT = "decode.logits"  # the name decode checks carry in the report's max |Δ| tables
EXPERT_CACHE_OUTPUT = "expert_cache.logits"  # the expert-cache form's logits vs the program's


def _op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return dict(sorted(ops.items()))


def _dtype_name(program: Program) -> str:
    for p in program.module.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def _attention_metrics(fused: list[str]) -> dict:
    from memc.codegen.attention import choose

    lowering = choose()
    return {"lowering": "com.microsoft.GroupQueryAttention" if fused else "standard ops",
            "fused_sites": len(fused), "onnxruntime": ort.__version__, "measured_on": lowering.measured or None}


@register_target
class OnnxRuntimeTarget(Target):
    name = "onnx"

    def __init__(self, config):
        super().__init__(config)
        # Caches for one check -> build -> verify sequence, keyed so that a target reused for another program
        # or another output directory re-exports / reopens instead of answering for the previous one.
        self._export: tuple[Program, torch.export.ExportedProgram] | None = None
        self._session: tuple[Path, ort.InferenceSession] | None = None
        self._fused: list[str] = []
        self._cache_plan = None

    def _exported(self, program: Program) -> torch.export.ExportedProgram:
        """The program re-exported, its plain causal attention sites fused for onnxruntime (codegen.attention)."""
        if self._export is None or self._export[0] is not program:
            from memc.codegen.attention import fuse_attention

            try:
                fused, self._fused = fuse_attention(program)
                self._export = (program, fused.export())
            except Exception as exc:
                raise CaptureError(f"re-exporting the rewritten program failed: {type(exc).__name__}: {exc}") from None
        return self._export[1]

    def check(self, program: Program) -> None:
        if self.config.decode_graph:
            from memc.codegen.decode_rewrite import check_decodable

            check_decodable(program)  # refuses sites without a decode form before anything is built
        if self.config.expert_cache.slots:
            from memc.codegen.expert_cache import check_expert_cache

            self._cache_plan = check_expert_cache(program, self.config.expert_cache.slots)
        check_quant_formats(program, self.name)
        check_exportable(self._exported(program), self.config.opset)

    def build(self, program: Program, out_dir: Path) -> BuildResult:
        model = export_onnx(
            program, self._exported(program), self.config.opset, self.config.optimize, self.config.debug_metadata
        )
        path = out_dir / MODEL_FILE
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        metrics = {"opset": self.config.opset, "nodes": len(model.graph.node), "op_histogram": _op_histogram(model),
                   "attention": _attention_metrics(self._fused),
                   # how memc's runtime runs these graphs; another deployment's session should do the same
                   "session": {"config": dict(SESSION_CONFIG), "flush_denormals": True,
                               "note": "FTZ/DAZ on the thread running the session (memc.targets.float_env): softmax "
                                       "leaves denormals that cost Intel cores a microcode assist per op"}}
        artifacts = [Artifact(MODEL_FILE, path.stat().st_size, "onnx model")]
        if self.config.decode_graph:
            artifacts.append(self._build_decode(program, out_dir, metrics))
        if self.config.expert_cache.slots:
            artifacts += self._build_expert_cache(program, out_dir, metrics)
        return BuildResult(artifacts, metrics)

    def _build_expert_cache(self, program: Program, out_dir: Path, metrics: dict) -> list[Artifact]:
        from memc.codegen.expert_cache import build_expert_cache, check_expert_cache

        plan = self._cache_plan or check_expert_cache(program, self.config.expert_cache.slots)
        layout = build_expert_cache(program, out_dir, plan.slots, self.config.opset, self.config.optimize, plan)
        metrics["expert_cache"] = layout
        root = out_dir / layout["dir"]
        roles = {"segment": "expert cache: graph segment between MoE routers",
                 "experts": "expert cache: experts graph over slot buffers", "expert_cache.json": "expert cache layout",
                 "experts.bin": "expert cache: store of expert records (memory-mapped)"}
        return [Artifact(f"{layout['dir']}/{f.name}", f.stat().st_size,
                         next(r for k, r in roles.items() if f.name.startswith(k)))
                for f in sorted(root.iterdir())]

    def _build_decode(self, program: Program, out_dir: Path, metrics: dict) -> Artifact:
        from memc.codegen.decode import decode_graph, lower_decode, save_onnx_atomic, state_layout

        graph = decode_graph(program)
        model = lower_decode(graph, self.config.opset, self.config.optimize, self.config.debug_metadata)
        path = out_dir / DECODE_FILE
        save_onnx_atomic(model, path)
        metrics["decode"] = {
            "file": DECODE_FILE,
            "layers": graph.layers,
            "state": state_layout(graph),
            "nodes": len(model.graph.node),
            "op_histogram": _op_histogram(model),
        }
        return Artifact(DECODE_FILE, path.stat().st_size, "decode graph: input_ids + past state -> logits + present")

    def run(self, out_dir: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        path = out_dir / MODEL_FILE
        if self._session is None or self._session[0] != path:
            self._session = (path, create_session(path))
        session = self._session[1]
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
        return session.run(None, feeds)

    def verify(self, program: Program, out_dir: Path, samples: list[tuple[torch.Tensor, ...]]) -> Verification:
        result = super().verify(program, out_dir, samples)
        if self.config.decode_graph:
            result.samples.extend(self._verify_decode(program, out_dir, samples))
            greedy = self._verify_greedy(program, out_dir, samples[0][0])
            result.samples.append(SampleCheck(
                {"input_ids": [1, greedy.prompt + greedy.steps]}, {DECODE_OUTPUT: greedy.max_abs_diff},
                f"decode: prefill {greedy.prompt} + {greedy.steps} steps along the greedy path",
            ))
            result.decode = {"greedy": greedy.as_dict()}
        if self.config.expert_cache.slots:
            result.samples.extend(self._verify_expert_cache(program, out_dir, samples))
        return result

    def _verify_expert_cache(self, program: Program, out_dir: Path, samples: list[tuple[torch.Tensor, ...]]
                             ) -> list[SampleCheck]:
        """Each sample through the expert cache (prefill of the first half, then one step per token, experts
        loaded on demand into the compiled slot count) vs the program's full-sequence logits."""
        from memc.codegen.decode import program_reference
        from memc.runtime.engine import decode_logits
        from memc.runtime.expert_cache import ExpertCacheEngine

        reference = program_reference(program)
        checks, shape = [], []
        try:
            engine = ExpertCacheEngine(out_dir, slots=self.config.expert_cache.slots)
            for inputs in samples:
                ids = inputs[0].numpy().astype(np.int64)
                if ids.ndim != 2 or ids.shape[1] < 2:
                    continue
                shape = list(ids.shape)
                prefill = (ids.shape[1] + 1) // 2
                got = decode_logits(engine, ids, prefill)
                diff = float(np.abs(got.astype(np.float64) - reference(ids).astype(np.float64)).max())
                checks.append(SampleCheck({"input_ids": shape}, {EXPERT_CACHE_OUTPUT: diff},
                                          f"expert cache ({engine.slots} slots): prefill {prefill} + "
                                          f"{ids.shape[1] - prefill} steps"))
        except Exception as exc:
            where = f" on input_ids of shape {shape}" if shape else ""
            raise VerificationError(f"the expert cache failed to run{where}: {first_line(exc)}") from None
        return checks

    def _verify_greedy(self, program: Program, out_dir: Path, ids: torch.Tensor):
        """``decode_steps`` greedy tokens (and prefill + as many steps of logits) after the first sample's first
        row, capped by the model's context."""
        from memc.codegen.decode import greedy_check, program_reference

        prompt = ids[:1].numpy().astype(np.int64)
        steps, limit = self.config.decode_steps, program.source.max_seq_len
        if limit is not None:  # keep prompt + steps inside the model's context (the prompt shrinks first)
            prompt = prompt[:, : max(1, min(prompt.shape[1], limit - steps))]
            steps = min(steps, limit - prompt.shape[1])
        try:
            return greedy_check(out_dir / DECODE_FILE, program_reference(program), prompt, steps)
        except Exception as exc:
            raise VerificationError(f"the decode graph failed to run along the greedy path: {first_line(exc)}") from None

    def _verify_decode(
        self, program: Program, out_dir: Path, samples: list[tuple[torch.Tensor, ...]]
    ) -> list[SampleCheck]:
        """Each sample's input_ids as prefill of the first half + one step per remaining token vs one forward."""
        from memc.codegen.decode import program_reference, verify_decode
        from memc.runtime.engine import DecodeEngine

        reference = program_reference(program)

        checks = []
        shape: list[int] = []
        try:
            engine = DecodeEngine(out_dir / DECODE_FILE)
            for inputs in samples:
                ids = inputs[0]
                if ids.dim() != 2 or ids.shape[1] < 2:
                    continue
                shape = list(ids.shape)
                check = verify_decode(engine, reference, ids, atol=self.config.atol)
                checks.append(SampleCheck(
                    {"input_ids": shape}, {DECODE_OUTPUT: check.max_abs_diff},
                    f"decode: prefill {check.prefill} + {check.steps} steps",
                ))
        except Exception as exc:
            where = f" on input_ids of shape {shape}" if shape else ""
            raise VerificationError(
                f"the decode graph failed to run{where}: {first_line(exc)}",
                hint="the lowering produced a graph the runtime rejects; try another opset or model.dtype float32",
            ) from None
        return checks
