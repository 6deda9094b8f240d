"""Backends: one interface over a captured torch Program and a compiled ONNX artifact.

``forward`` takes numpy int64 token arrays by input name and returns the first output as float32 numpy, which is
all perplexity, recall, embedding and speed measurements need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memc.errors import MemcError
from memc.tokenizer_files import has_tokenizer


@dataclass
class ModelInfo:
    task: str  # causal-lm | encoder
    input_names: list[str]
    vocab_size: int | None
    max_seq_len: int | None
    parameter_bytes: int
    source_dir: Path | None  # the HF directory (tokenizer, config.json) when known
    extra: dict[str, Any] = field(default_factory=dict)
    shipped_tokenizer: Path | None = None  # an artifact directory holding a copy of the tokenizer

    @property
    def tokenizer_dir(self) -> Path | None:
        """Where to read the tokenizer: the copy shipped with an artifact, else the source directory."""
        return self.shipped_tokenizer if has_tokenizer(self.shipped_tokenizer) else self.source_dir


class Backend:
    name: str
    info: ModelInfo
    decode_graph: Path | None = None  # decode.onnx with explicit state (KV / memory-caching), when the artifact has one
    threads: int = 0
    _decode_engine: Any = None

    def decode_engine(self) -> Any:
        """memc.runtime.DecodeEngine over ``decode_graph`` (opened once), or None without a decode graph."""
        if self.decode_graph is None:
            return None
        if self._decode_engine is None:
            from memc.runtime.engine import DecodeEngine, DecodeStateError

            try:
                self._decode_engine = DecodeEngine(self.decode_graph, self.threads)
            except (DecodeStateError, OSError) as exc:
                raise MemcError(f"{self.decode_graph}: {exc}") from None
        return self._decode_engine

    def forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class TorchBackend(Backend):
    """A memc Program (captured from an HF dir, .pt2, factory or pickle)."""

    name = "torch"

    def __init__(self, program: Any):
        self.program = program
        src = program.source
        source_dir = Path(src.path) if src.kind == "hf" else None
        self.info = ModelInfo(
            src.task, list(program.input_names), src.vocab_size, src.max_seq_len,
            program.parameter_stats()[1], source_dir,
        )

    def forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.info.input_names]
        return self.program(*args)[0].float().numpy()


class OnnxBackend(Backend):
    """A memc output directory (model.onnx + report.json) or a bare .onnx file, run with onnxruntime."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 0):
        from memc.targets.session import create_session

        model = path / "model.onnx" if path.is_dir() else path
        try:
            self.session = create_session(model, threads)
        except Exception as exc:
            raise MemcError(f"{model} is not a loadable ONNX model: {type(exc).__name__}: {exc}") from None
        names = [i.name for i in self.session.get_inputs()]
        report_path = model.parent / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        source = report.get("source", {})
        task = source.get("task") or ("encoder" if "attention_mask" in names else "causal-lm")
        if "input_ids" not in names:
            raise MemcError(
                f"{model} takes inputs {names}; memc eval needs a token model with an 'input_ids' input"
            )
        src_dir = Path(source["path"]) if source.get("kind") == "hf" and Path(source.get("path", "")).is_dir() else None
        out_dims = self.session.get_outputs()[0].shape
        vocab = source.get("vocab_size") or (out_dims[-1] if task == "causal-lm" and isinstance(out_dims[-1], int) else None)
        params = report.get("compiled", {}).get("parameter_bytes") or _initializer_bytes(model)
        decode = model.parent / "decode.onnx"
        self.decode_graph = decode if decode.is_file() else None
        self.threads = threads
        passes = [p.get("name") for p in report.get("passes", []) if isinstance(p, dict)]
        self.info = ModelInfo(task, names, vocab, source.get("max_seq_len"), params, src_dir,
                              extra={"passes": passes}, shipped_tokenizer=model.parent)

    def forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {n: feeds[n] for n in self.info.input_names})[0]


def _initializer_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def is_onnx_artifact(path: Path) -> bool:
    return path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file())


def load_backend(source: str, *, config: Any = None, trust_pickle: bool = False, threads: int = 0) -> Backend:
    """An ONNX artifact (dir with model.onnx, or .onnx) or anything ``memc compile`` accepts."""
    path = Path(source)
    if is_onnx_artifact(path):
        return OnnxBackend(path, threads)
    from memc.capture import capture
    from memc.config import ToolchainConfig

    cfg = config or ToolchainConfig()
    program = capture(source, cfg, trust_pickle=trust_pickle)
    if program.source.task not in ("causal-lm", "encoder"):
        raise MemcError(f"memc eval needs a token model (causal LM or encoder); {source} is a {program.source.task} model")
    return TorchBackend(program)
