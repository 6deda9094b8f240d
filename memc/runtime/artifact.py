"""``memc.load(artifact_dir)``: a compiled artifact as a small runtime handle, with onnxruntime and numpy only.

``run`` executes model.onnx (inputs checked against the graph by name, rank, static sizes and element type);
``generate`` drives decode.onnx, the stateful decode graph, when the artifact has one. Importing this never
imports torch, so deployment processes stay small.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from memc.errors import ArtifactError
from memc.report_schema import REPORT_SCHEMA_ID
from memc.runtime.engine import DECODE_FILE, DecodeEngine, DecodeStateError
from memc.runtime.sampling import SamplingError
from memc.targets.session import create_session

if TYPE_CHECKING:
    from memc.runtime.expert_cache import ExpertCacheEngine

MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def _read_report(path: Path) -> dict[str, Any] | None:
    file = path / REPORT_FILE
    if not file.is_file():
        return None
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file} is not readable JSON: {exc}") from None
    schema = report.get("schema") if isinstance(report, dict) else None
    if schema is not None and schema != REPORT_SCHEMA_ID:
        raise ArtifactError(
            f"{file} has schema {schema!r}; this memc reads {REPORT_SCHEMA_ID!r}",
            hint="load it with the memc version that wrote it, or recompile",
        )
    return report


class CompiledModel:
    """A memc output directory: ``run(*inputs)`` / ``run(name=array)`` and, with decode.onnx, ``generate``."""

    def __init__(self, path: str | Path, threads: int = 0):
        self.path = Path(path)
        model = self.path / MODEL_FILE
        if not self.path.is_dir() or not model.is_file():
            what = "does not exist" if not self.path.exists() else f"has no {MODEL_FILE}"
            raise ArtifactError(f"{self.path} is not a memc artifact: it {what}",
                                hint="give the output directory of `memc compile` / memc.compile")
        self.report = _read_report(self.path)
        try:
            self.session = create_session(model, threads)
        except Exception as exc:
            raise ArtifactError(f"{model} is not a loadable ONNX model: {type(exc).__name__}: {exc}") from None
        self._inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._threads = threads
        self._decode: DecodeEngine | None = None

    def __repr__(self) -> str:
        return f"CompiledModel({str(self.path)!r}, inputs={self.input_names}, outputs={self.output_names})"

    @property
    def has_decode_graph(self) -> bool:
        return (self.path / DECODE_FILE).is_file()

    @property
    def decode(self) -> DecodeEngine:
        """The DecodeEngine over decode.onnx (prefill / step / generate with explicit KV state)."""
        if self._decode is None:
            if not self.has_decode_graph:
                raise ArtifactError(
                    f"{self.path} has no {DECODE_FILE}: it was compiled without a decode graph",
                    hint="compile a Hugging Face causal LM with target.decode_graph = true "
                    "(--set target.decode_graph=true)",
                )
            try:
                self._decode = DecodeEngine(self.path, self._threads)
            except (DecodeStateError, OSError) as exc:
                raise ArtifactError(f"{self.path / DECODE_FILE}: {exc}") from None
        return self._decode

    @property
    def has_expert_cache(self) -> bool:
        from memc.runtime.expert_cache import has_expert_cache

        return has_expert_cache(self.path)

    def expert_cache(self, slots: int | None = None, trace: bool = False) -> "ExpertCacheEngine":
        """The ExpertCacheEngine over expert_cache/ (``slots``: experts resident per layer, default as compiled)."""
        from memc.runtime.expert_cache import ExpertCacheEngine

        if not self.has_expert_cache:
            raise ArtifactError(f"{self.path} has no expert cache: it was compiled without one",
                                hint="compile an MoE model with --set target.expert_cache.slots=C")
        try:
            return ExpertCacheEngine(self.path, self._threads, slots, trace)
        except (DecodeStateError, OSError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: expert cache: {exc}") from None

    def _feeds(self, args: Sequence[Any], named: dict[str, Any]) -> dict[str, np.ndarray]:
        if len(args) > len(self.input_names):
            raise ArtifactError(f"run() got {len(args)} positional inputs; the model takes {len(self.input_names)}: "
                                f"{self.input_names}")
        given = dict(zip(self.input_names, args))
        for name, value in named.items():
            if name not in self.input_names:
                raise ArtifactError(f"run() got an input named {name!r}; the model's inputs are {self.input_names}")
            if name in given:
                raise ArtifactError(f"run() got input {name!r} both by position and by name")
            given[name] = value
        missing = [n for n in self.input_names if n not in given]
        if missing:
            raise ArtifactError(f"run() is missing input(s) {missing}; the model takes {self.input_names}")
        feeds = {}
        for spec in self._inputs:
            array = np.asarray(given[spec.name])
            want = _ORT_TYPES.get(spec.type)
            if want is not None and array.dtype != want:
                if not np.can_cast(array.dtype, want, casting="same_kind"):
                    raise ArtifactError(f"input {spec.name!r} has dtype {array.dtype}; the model takes {np.dtype(want)}")
                array = array.astype(want)
            shape = spec.shape
            if array.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, array.shape)):
                wanted = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape)
                raise ArtifactError(f"input {spec.name!r} has shape {list(array.shape)}; the model takes [{wanted}]")
            feeds[spec.name] = np.ascontiguousarray(array)
        return feeds

    def run(self, *inputs: Any, **named: Any) -> tuple[np.ndarray, ...]:
        """model.onnx on numpy arrays (positional in input order, or by name): one array per output."""
        feeds = self._feeds(inputs, named)
        try:
            return tuple(self.session.run(self.output_names, feeds))
        except Exception as exc:
            raise ArtifactError(f"onnxruntime failed to run {self.path / MODEL_FILE}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def generate(self, prompt_ids: Any, max_new_tokens: int, eos_token_id: int | None = None, **sampling: Any
                 ) -> np.ndarray:
        """Decoding through decode.onnx: the prompt ([seq] or [batch, seq]) plus up to max_new_tokens; greedy, or
        sampled with ``temperature`` / ``top_k`` / ``top_p`` / ``seed`` (and ``stop_ids``), see DecodeEngine.generate."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ArtifactError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        unknown = sorted(set(sampling) - {"temperature", "top_k", "top_p", "seed", "stop_ids"})
        if unknown:
            raise ArtifactError(f"generate() got unknown option(s) {unknown}; it takes temperature, top_k, top_p, "
                                "seed, stop_ids")
        engine = self.decode
        try:
            return engine.generate(prompt_ids, max_new_tokens, eos_token_id, **sampling)
        except (DecodeStateError, SamplingError) as exc:
            raise ArtifactError(str(exc)) from None


def load(artifact_dir: str | Path, *, threads: int = 0) -> CompiledModel:
    """Open a memc output directory for inference (no torch): ``memc.load("out/api").run(x)``.

    ``threads`` > 0 pins onnxruntime's intra-op threads (1 gives comparable timings).
    """
    return CompiledModel(artifact_dir, threads)
