"""The stateful decode form of a compiled Program: one ONNX graph with explicit state inputs and outputs.

    (input_ids [batch, seq], past state...) -> (logits [batch, seq, vocab], present state...)

The graph is a lowering of the Program *after its passes* (memc.codegen.decode_rewrite builds the step form of
its fx graph: KV caches for plain attention sites, the fixed-layout MemoryCachingState for memory-caching sites),
so every rewrite deploys in its decode form. One graph serves both phases: prefill feeds the empty state, a step
feeds one token and the previous call's presents. KV caches are either preallocated buffers plus a
``past_length`` input (GroupQueryAttention, updated in place under I/O binding) or growing arrays (Concat; past
length 0 at prefill), as memc.codegen.attention chooses for the onnxruntime version. A graph with a memory-caching
site takes one token per call (static seq 1); the engine feeds a prompt token by token. The state layout (names,
shapes with the symbolic dims ``batch`` / ``past`` / ``capacity``, dtypes, and ``memc.kv_cache``: how the KV
tensors are driven) is written into the graph's metadata and into report.json; memc.runtime.DecodeEngine reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from memc.atomic import atomic_file
from memc.codegen.decode_fusion import ROTARY_POSITIONS, rotary_into_attention, share_lengths
from memc.codegen.decode_rewrite import DecodeGraph, decode_graph, export_decode
from memc.codegen.onnx import check_exportable, lower_exported
from memc.errors import CaptureError, UnsupportedError, first_line
from memc.program import Program
from memc.runtime.engine import DECODE_FILE, DecodeEngine, decode_logits

__all__ = ["DecodeGraph", "decode_graph", "lower_decode", "build_decode_artifact", "verify_decode", "greedy_check"]


def lower_decode(
    graph: DecodeGraph, opset: int = 18, optimize: bool = True, debug_metadata: bool = False
) -> onnx.ModelProto:
    """torch.export the step form (dynamic batch, and seq / past where the graph has them) and lower it to ONNX.

    The op-support check (which repeats the exporter's decompositions) runs only when lowering fails, to name the
    unsupported nodes instead of showing the exporter's error.
    """
    try:
        ep = export_decode(graph)
    except Exception as exc:
        raise CaptureError(f"torch.export of the decode form of {graph.source} failed: {first_line(exc)}") from None
    dim_names = {name: {a: s.name for a, s in axes.items()} for name, axes in graph.dims().items()}
    try:
        model = lower_exported(
            ep, graph.example_inputs(), graph.input_names, graph.output_names, dim_names, opset, optimize,
            debug_metadata,
        )
    except Exception as exc:
        check_exportable(ep, opset)
        raise UnsupportedError(
            f"lowering the decode form of {graph.source} to ONNX (opset {opset}) failed: {first_line(exc)}"
        ) from None
    if graph.length_input:  # the rotary table's length goes into memc.kv_cache: the engine refuses steps beyond it
        positions = max(ROTARY_POSITIONS, graph.max_seq_len or 0)
        if rotary_into_attention(model, graph.length_input, positions):
            graph.rotary_positions = positions
        share_lengths(model, graph.length_input)
    meta = {
        "memc.graph": "decode",
        "memc.layers": str(graph.layers),
        "memc.max_seq_len": str(graph.max_seq_len or 0),
        "memc.seq": "dynamic" if graph.seq_dynamic else "1",
        "memc.state": json.dumps([s.as_dict() for s in graph.state]),
    }
    if graph.kv_layout:
        meta["memc.kv_cache"] = json.dumps(kv_cache_layout(graph))
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


def kv_cache_layout(graph: DecodeGraph) -> dict[str, Any]:
    """How the KV tensors are driven (``memc.kv_cache`` in the graph's metadata, ``kv_cache`` in report.json)."""
    if graph.kv_layout == "preallocated":
        return {
            "layout": "preallocated", "length_input": graph.length_input, "length_dtype": "int64",
            "capacity_axis": 2,
            "rule": "past_key_i / past_value_i are buffers of any capacity >= past_length + seq; the new keys / "
                    "values are written at positions past_length .. past_length + seq - 1 and present_* have the "
                    "buffers' shape. Bind each present_* output to its past_* input's memory (I/O binding) to "
                    "update in place; the next call's past_length is past_length + seq. Batch > 1 continuing a "
                    "non-empty cache takes one token per call."
                    + (f" Attention applies the rotary from a table of {graph.rotary_positions} positions: "
                       "past_length + seq must not exceed it." if graph.rotary_positions else ""),
            **({"rotary_positions": graph.rotary_positions} if graph.rotary_positions else {}),
        }
    return {"layout": "concat", "rule": "present_* = concat(past_*, new) along axis 2 (past); feed them back"}


def state_layout(graph: DecodeGraph) -> dict[str, Any]:
    """What report.json records: enough for a deployment in another language to drive the graph."""
    layout = {
        "seq": "dynamic" if graph.seq_dynamic else 1,
        "inputs": graph.input_names,
        "sites": graph.sites,
        "tensors": [s.as_dict() for s in graph.state],
        "outputs": graph.output_names,
    }
    if graph.kv_layout:
        layout["kv_cache"] = kv_cache_layout(graph)
    return layout


def save_onnx_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Write and check an ONNX model via a temporary sibling file and a rename (memc.atomic.atomic_file)."""
    with atomic_file(path) as tmp:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))


def program_of(model_dir: str | Path, dtype: str = "float32") -> Program:
    """Capture an HF causal LM directory as ``memc compile`` does (no passes)."""
    from memc.capture.loaders import capture
    from memc.config import parse_config

    return capture(str(model_dir), parse_config({"model": {"dtype": dtype}}))


def build_decode_artifact(
    model: str | Path | Program,
    out_dir: str | Path,
    opset: int = 18,
    *,
    dtype: str = "float32",
    optimize: bool = True,
    debug_metadata: bool = False,
    attention: str = "auto",
) -> Path:
    """Write ``out_dir/decode.onnx`` (atomically) for a Program, or an HF causal LM directory captured as
    ``memc compile`` does; returns its path. ``attention``: auto | gqa | standard (memc.codegen.attention)."""
    program = model if isinstance(model, Program) else program_of(model, dtype)
    onnx_model = lower_decode(decode_graph(program, attention), opset, optimize, debug_metadata)
    path = Path(out_dir) / DECODE_FILE
    save_onnx_atomic(onnx_model, path)
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
        from memc.capture.hf import load_pretrained

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


def program_reference(program: Program) -> Callable[[np.ndarray], np.ndarray]:
    """Full-sequence logits of the (rewritten) torch Program."""

    def logits(ids: np.ndarray) -> np.ndarray:
        return program(torch.from_numpy(np.ascontiguousarray(ids)))[0].float().numpy()

    return logits


@dataclass
class GreedyCheck:
    """The decode graph along the reference's greedy path: prefill of the prompt, then ``steps`` single-token steps
    fed the reference's greedy tokens. ``equal``: the graph's own greedy token (argmax of its logits) equals the
    reference's at every one of the ``steps`` new tokens; ``max_abs_diff``: its logits (every prompt position and
    every step) vs the reference's full-sequence logits of the same tokens."""

    prompt: int
    steps: int
    equal: bool
    first_mismatch: int | None  # index of the first differing new token
    prefill_max_abs_diff: float
    step_max_abs_diff: float

    @property
    def max_abs_diff(self) -> float:
        return max(self.prefill_max_abs_diff, self.step_max_abs_diff)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "steps": self.steps, "equal": self.equal,
                "first_mismatch": self.first_mismatch, "max_abs_diff": self.max_abs_diff,
                "prefill_max_abs_diff": self.prefill_max_abs_diff, "step_max_abs_diff": self.step_max_abs_diff}


def greedy_check(engine: Any, reference: Callable[[np.ndarray], np.ndarray], prompt: np.ndarray,
                 steps: int) -> GreedyCheck:
    """``steps`` greedy tokens after ``prompt [batch, seq]`` through the engine and through the reference.

    The reference runs one full forward per new token (no cache). The engine is fed the reference's tokens, so a
    mismatch at token i does not change what is compared after it; while the tokens agree this is exactly the
    engine's own greedy run. One more step after the last token makes it prefill + ``steps`` steps of logits.
    """
    if not isinstance(engine, DecodeEngine):
        engine = DecodeEngine(engine)
    ids = np.asarray(prompt, dtype=np.int64)
    ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
    logits, state = engine.prefill(ids)
    want = np.asarray(reference(ids), dtype=np.float64)
    prefill_diff = float(np.abs(logits.astype(np.float64) - want).max())
    step_diff, mismatches, seq = 0.0, [], ids
    want_last = want[:, -1]
    for i in range(steps):
        token = want_last.argmax(-1).astype(np.int64)
        if (logits[:, -1].argmax(-1) != token).any():
            mismatches.append(i)
        seq = np.concatenate([seq, token[:, None]], axis=1)
        logits, state = engine.step(token, state)
        want_last = np.asarray(reference(seq)[:, -1], dtype=np.float64)
        step_diff = max(step_diff, float(np.abs(logits[:, -1].astype(np.float64) - want_last).max()))
    first = mismatches[0] if mismatches else None
    return GreedyCheck(int(ids.shape[1]), steps, not mismatches, first, prefill_diff, step_diff)
