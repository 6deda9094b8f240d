"""The stateful decode form of a Hugging Face causal LM: one ONNX graph with explicit KV state inputs and outputs.

    (input_ids [batch, seq], past_key_0, past_value_0, ..., past_key_{L-1}, past_value_{L-1} [batch, heads, past, dim])
        -> (logits [batch, seq, vocab], present_key_0, present_value_0, ... [batch, heads, past + seq, dim])

One graph serves both phases: prefill feeds past arrays of length 0 (ONNX and onnxruntime accept a zero-length
axis), a decode step feeds one token and the previous call's presents. Positions come from the past length
(``past + arange(seq)``, passed to the model as explicit ``position_ids`` of shape [batch, seq]), so RoPE and learned
position embeddings are right in both phases. The cache the model sees is a transformers ``DynamicCache`` whose
layers are pre-filled with the past tensors; ``memc.runtime.engine.DecodeEngine`` drives the graph. One graph
instead of a prefill/step pair halves the artifact's weight bytes and keeps a single lowering to verify; a prefill
simply costs one Concat with an empty tensor per state.

Only full-attention KV caches are supported (every cache layer a plain ``DynamicLayer``); sliding-window, linear
attention and KV-sharing caches are refused with the layer types found.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from memc.atomic import atomic_file
from memc.capture.hf import load_pretrained
from memc.codegen.onnx import check_exportable, lower_exported
from memc.errors import CaptureError, UnsupportedError
from memc.program import DimSpec
from memc.runtime.engine import DECODE_FILE, DecodeEngine, decode_logits

# Example sizes for torch.export: distinct, and >= 2 on every dynamic axis (torch.export specialises 0 and 1).
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 5, 3


def state_names(layers: int, prefix: str) -> list[str]:
    """``past`` -> past_key_0, past_value_0, past_key_1, ...; ``present`` likewise."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


@functools.cache
def _state_cache_class() -> type:
    """A DynamicCache pre-filled with past tensors (built lazily: transformers is an optional dependency)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class StateLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

        def get_seq_length(self) -> int:
            # DynamicLayer answers 0 when ``keys.numel() == 0``, a data-dependent guard under torch.export; the past
            # axis is the length whether or not it is zero.
            return self.keys.shape[-2]

    class StateCache(DynamicCache):
        def __init__(self, past: tuple[torch.Tensor, ...]):
            layers = [StateLayer(past[i], past[i + 1]) for i in range(0, len(past), 2)]
            super(DynamicCache, self).__init__(layers=layers)

    return StateCache


def _decode_forward(self: torch.nn.Module, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """input_ids [b, t] and 2L past tensors [b, h, p, d] -> logits [b, t, V] and 2L presents [b, h, p + t, d]."""
    batch, seq = input_ids.shape
    # [batch, seq] rather than [1, seq]: at opset 23 the exporter emits ONNX RotaryEmbedding, whose cos/sin caches
    # must have the batch of the activations (a [1, seq] position tensor fails for batch >= 2 in onnxruntime).
    positions = (torch.arange(seq, device=input_ids.device) + past[0].shape[2]).unsqueeze(0).expand(batch, seq)
    out = type(self).forward(
        self, input_ids=input_ids, position_ids=positions, cache=_state_cache_class()(past), use_cache=True
    )
    present: list[torch.Tensor] = []
    for layer in out.cache.layers:
        present += [layer.keys, layer.values]
    return (out.logits, *present)


@dataclass
class DecodeGraph:
    """An HF causal LM whose forward is the decode form, with what torch.export and the exporter need."""

    module: torch.nn.Module
    layers: int
    key_shapes: list[tuple[int, int]]  # (heads, head_dim) of each layer's keys
    value_shapes: list[tuple[int, int]]
    dtype: torch.dtype
    vocab_size: int
    max_seq_len: int | None
    architecture: str
    source: str
    dims: dict[str, dict[int, DimSpec]] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *state_names(self.layers, "past")]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *state_names(self.layers, "present")]

    def example_inputs(self, batch: int = _EXAMPLE_BATCH, seq: int = _EXAMPLE_SEQ, past: int = _EXAMPLE_PAST) -> tuple:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (batch, seq), generator=gen)
        state = []
        for (kh, kd), (vh, vd) in zip(self.key_shapes, self.value_shapes):
            state += [torch.randn(batch, kh, past, kd, generator=gen).to(self.dtype),
                      torch.randn(batch, vh, past, vd, generator=gen).to(self.dtype)]
        return (ids, *state)

    def dynamic_shapes(self) -> dict[str, Any]:
        made: dict[str, Any] = {}

        def dims(name: str) -> dict[int, Any]:
            return {a: made.setdefault(s.name, s.to_torch()) for a, s in self.dims[name].items()}

        return {"input_ids": dims("input_ids"), "past": tuple(dims(n) for n in self.input_names[1:])}

    def export(self) -> torch.export.ExportedProgram:
        try:
            return torch.export.export(
                self.module, self.example_inputs(), dynamic_shapes=self.dynamic_shapes(), strict=False
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CaptureError(
                f"torch.export of the decode form of {self.source} failed: {type(exc).__name__}: {first}"
            ) from None


def decode_graph(model_dir: str | Path, dtype: str = "float32") -> DecodeGraph:
    """Load an HF causal LM directory (as memc's capture does) and give it the decode forward.

    The KV layout (layer count, heads and head size of keys and values) is read from the model's own cache after a
    2-token forward, so architectures that size their caches differently need no special case.
    """
    pre = load_pretrained(Path(model_dir), "causal-lm", dtype)
    model = pre.model
    with torch.no_grad():
        probe = type(model).forward(model, input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True)
    cache = getattr(probe, "cache", None)
    layers = list(getattr(cache, "layers", None) or [])
    if not layers:
        raise UnsupportedError(f"{model_dir}: {pre.architecture} returned no KV cache; it has no decode form")
    from transformers.cache_utils import DynamicLayer

    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise UnsupportedError(
            f"{model_dir}: {pre.architecture} uses cache layers {odd}; the decode graph supports full-attention "
            "KV caches (DynamicLayer) only",
            hint="sliding-window, linear-attention and KV-sharing caches need their own state layout",
        )
    key_shapes = [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]
    value_shapes = [(int(layer.values.shape[1]), int(layer.values.shape[3])) for layer in layers]
    model.forward = types.MethodType(_decode_forward, model)  # keeps transformers' module paths in name scopes
    max_len = pre.max_seq_len
    graph = DecodeGraph(
        model, len(layers), key_shapes, value_shapes, layers[0].keys.dtype, int(pre.config.vocab_size), max_len,
        pre.architecture, str(model_dir),
    )
    batch, seq, past = DimSpec("batch", 1, None), DimSpec("seq", 1, max_len), DimSpec("past", 0, max_len)
    graph.dims = {"input_ids": {0: batch, 1: seq}, **{n: {0: batch, 2: past} for n in graph.input_names[1:]}}
    return graph


def lower_decode(
    graph: DecodeGraph, opset: int = 18, optimize: bool = True, debug_metadata: bool = False
) -> onnx.ModelProto:
    """torch.export the decode form (dynamic batch, seq and past axes) and lower it to ONNX.

    The op-support check (which repeats the exporter's decompositions, seconds on a small model) runs only when
    lowering fails, to name the unsupported nodes instead of showing the exporter's error.
    """
    ep = graph.export()
    dim_names = {name: {a: s.name for a, s in axes.items()} for name, axes in graph.dims.items()}
    try:
        model = lower_exported(
            ep, graph.example_inputs(), graph.input_names, graph.output_names, dim_names, opset, optimize,
            debug_metadata,
        )
    except Exception as exc:
        check_exportable(ep, opset)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnsupportedError(
            f"lowering the decode form of {graph.source} to ONNX (opset {opset}) failed: {type(exc).__name__}: {first}"
        ) from None
    meta = {
        "memc.graph": "decode",
        "memc.layers": str(graph.layers),
        "memc.architecture": graph.architecture,
        "memc.max_seq_len": str(graph.max_seq_len or 0),
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


def save_onnx_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Write and check an ONNX model via a temporary sibling file and a rename (memc.atomic.atomic_file)."""
    with atomic_file(path) as tmp:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))


def build_decode_artifact(
    model_dir: str | Path,
    out_dir: str | Path,
    opset: int = 18,
    *,
    dtype: str = "float32",
    optimize: bool = True,
    debug_metadata: bool = False,
) -> Path:
    """Write ``out_dir/decode.onnx`` (atomically) for the HF causal LM in ``model_dir``; returns its path."""
    model = lower_decode(decode_graph(model_dir, dtype), opset, optimize, debug_metadata)
    path = Path(out_dir) / DECODE_FILE
    save_onnx_atomic(model, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Verification: prefill + steps through the engine == full-sequence logits of the reference (no cache)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DecodeCheck:
    """Engine logits (prefill of ``prefill`` tokens, then one step per remaining token) vs the reference's logits
    for the whole sequence in one forward."""

    shape: list[int]  # [batch, seq] of the checked sequence
    prefill: int
    steps: int
    prefill_max_abs_diff: float
    step_max_abs_diff: float
    atol: float

    @property
    def max_abs_diff(self) -> float:
        return max(self.prefill_max_abs_diff, self.step_max_abs_diff)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def as_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape, "prefill": self.prefill, "steps": self.steps, "max_abs_diff": self.max_abs_diff,
            "prefill_max_abs_diff": self.prefill_max_abs_diff, "step_max_abs_diff": self.step_max_abs_diff,
            "atol": self.atol, "passed": self.passed,
        }


def hf_reference(model: torch.nn.Module | str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Full-sequence logits of an HF causal LM without a cache: a loaded model, or a directory loaded like capture."""
    if not isinstance(model, torch.nn.Module):
        model = load_pretrained(Path(model), "causal-lm").model

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = type(model).forward(model, input_ids=torch.from_numpy(np.ascontiguousarray(ids)), use_cache=False)
        return out.logits.float().numpy()

    return logits


def verify_decode(
    engine: Any,
    reference: Callable[[np.ndarray], np.ndarray] | torch.nn.Module | str | Path,
    input_ids: np.ndarray | torch.Tensor,
    prefill: int | None = None,
    atol: float = 1e-4,
) -> DecodeCheck:
    """Check the decode artifact against the reference on one token sequence.

    ``engine``: a ``DecodeEngine`` or a path to ``decode.onnx`` (or its directory). ``reference``: a callable
    ``ids [b, t] -> logits [b, t, V]``, an HF model, or an HF model directory (run with ``use_cache=False``).
    ``prefill`` tokens (default: half of them, at least 1) go through one prefill call, each remaining token through
    one step; the concatenated logits are compared with the reference's single forward.
    """
    if not isinstance(engine, DecodeEngine):
        engine = DecodeEngine(engine)
    is_fn = callable(reference) and not isinstance(reference, torch.nn.Module)
    ref_fn = reference if is_fn else hf_reference(reference)
    ids = input_ids.numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    ids = ids.astype(np.int64).reshape(1, -1) if ids.ndim == 1 else ids.astype(np.int64)
    seq = ids.shape[1]
    prefill = max(1, (seq + 1) // 2) if prefill is None else prefill
    if not 1 <= prefill <= seq:
        raise ValueError(f"prefill must be in 1..{seq} for a sequence of {seq} tokens, got {prefill}")
    got = decode_logits(engine, ids, prefill).astype(np.float64)
    want = np.asarray(ref_fn(ids), dtype=np.float64)
    if got.shape != want.shape:
        raise ValueError(f"decode logits have shape {got.shape}, the reference's {want.shape}")
    diff = np.abs(got - want)
    step = float(diff[:, prefill:].max()) if seq > prefill else 0.0
    return DecodeCheck(list(ids.shape), prefill, seq - prefill, float(diff[:, :prefill].max()), step, atol)
