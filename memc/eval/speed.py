"""Prefill throughput and per-token decode latency, as medians over repeats after a warm-up.

``model.onnx`` carries no decode state (capture pins ``use_cache=False``), so without a decode graph decode is
*recompute* decode: one forward over the whole prefix per new token, and every context must fit the model.

With ``decode.onnx`` (``[target] decode_graph = true``) decode is measured the way it deploys: single steps of the
DecodeEngine from a state of the context's length, the median of ``steps`` steps, plus the state's bytes. The
state is built, not prefilled, so 32k contexts take seconds: a KV cache of ``context - 1`` positions (zeros: a
step's cost depends on the cache's length, not its values); a fixed-size (memory-caching) state from a real
prefill of up to ``FILL_TOKENS`` tokens, with its token counters then set to ``context - 1`` so positions and
counters are those of that context. Such contexts may exceed the model's trained positions — allowed for speed and
state (the point says so in ``note``), never for quality; prefill there is not measured (``None``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from memc.errors import MemcError
from memc.eval.backends import Backend
from memc.eval.perplexity import check_context

FILL_TOKENS = 256  # real tokens behind a fixed-size state before its counters are moved to the context


@dataclass
class SpeedPoint:
    context: int
    prefill_tokens_per_s: float | None
    prefill_ms: float | None
    decode_ms_per_token: float
    decode_mode: str = "recompute"  # or kv-state / mc-state (memory caching) / kv+mc-state
    state_bytes: int | None = None
    note: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _feeds(backend: Backend, ids: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids}
    if "attention_mask" in backend.info.input_names:
        feeds["attention_mask"] = np.ones_like(ids)
    return feeds


def check_speed_context(backend: Backend, context: int) -> None:
    """With a decode graph any context >= 2 (beyond the trained positions: speed and state only); else
    ``check_context``: a recompute forward needs the whole context to fit the model."""
    if backend.decode_graph is None:
        check_context(backend, context)
    elif context < 2:
        raise MemcError(f"--speed: context {context} is too short; use >= 2")


def speed(
    backend: Backend, contexts: list[int], repeats: int = 5, decode_steps: int = 4, seed: int = 0, steps: int = 16
) -> list[SpeedPoint]:
    """``decode_steps``: recompute tokens per repeat (no decode graph); ``steps``: decode-graph steps timed."""
    rng = np.random.default_rng(seed)
    vocab = backend.info.vocab_size or 2
    trained = backend.info.max_seq_len
    engine = backend.decode_engine()
    points = []
    for context in contexts:
        check_speed_context(backend, context)
        beyond = trained is not None and context > trained
        ids = rng.integers(0, vocab, size=(1, context), dtype=np.int64)
        prefill = None if beyond else median_seconds(lambda: backend.forward(_feeds(backend, ids)), repeats)
        note = (f"beyond the model's {trained} trained positions: speed and state only (no quality claim); "
                "prefill not measured") if beyond else None
        if engine is not None:
            decode_s, state_bytes = _state_step_seconds(engine, context, rng, engine.vocab_size or vocab, steps)
            kinds = {s.kind for s in engine.state_specs}
            mode = {frozenset({"kv"}): "kv-state", frozenset({"mc"}): "mc-state"}.get(
                frozenset(kinds), "kv+mc-state")
        else:
            decode_s, state_bytes = _recompute_step_seconds(backend, ids, repeats, decode_steps), None
            mode = "recompute"
        points.append(SpeedPoint(
            context, None if prefill is None else context / prefill, None if prefill is None else prefill * 1e3,
            decode_s * 1e3, mode, state_bytes, note,
        ))
    return points


def _recompute_step_seconds(backend: Backend, ids: np.ndarray, repeats: int, steps: int) -> float:
    context = ids.shape[1]
    start = max(context - steps, 1)

    def decode() -> None:
        for t in range(start, context):
            backend.forward(_feeds(backend, ids[:, : t + 1]))

    return median_seconds(decode, max(repeats // 2, 1)) / max(context - start, 1)


def state_at(engine, past: int, rng: np.random.Generator, vocab: int, fill_tokens: int = FILL_TOKENS) -> list:
    """A batch-1 state standing for ``past`` tokens (see the module docstring): KV caches of length ``past``,
    fixed-size tensors from a real prefill of ``min(past, fill_tokens)`` tokens with their counters at ``past``."""
    fixed = any("past" not in s.shape for s in engine.state_specs)
    real = min(past, fill_tokens) if fixed else 0
    state = engine.prefill(rng.integers(0, vocab, size=(1, real), dtype=np.int64))[1] if real else \
        engine.empty_state(1)
    out = []
    for spec, array in zip(engine.state_specs, state):
        if "past" in spec.shape:
            axis = spec.shape.index("past")
            pad = list(array.shape)
            pad[axis] = past - array.shape[axis]
            array = np.concatenate([array, np.zeros(pad, array.dtype)], axis=axis)
        elif np.issubdtype(array.dtype, np.integer) and array.ndim == 0:  # a token counter (memory caching's t)
            array = np.asarray(past, dtype=array.dtype)
        out.append(np.asarray(array, order="C"))  # (ascontiguousarray would make a 0-d counter 1-d)
    return out


def _state_step_seconds(engine, context: int, rng: np.random.Generator, vocab: int, steps: int) -> tuple[float, int]:
    """Median seconds of one step after ``context - 1`` tokens, and the state's bytes at ``context`` tokens."""
    limit = engine.max_seq_len
    engine.max_seq_len = None  # timing only: the step may sit beyond the trained positions
    try:
        state = state_at(engine, context - 1, rng, vocab)
        token = rng.integers(0, vocab, size=1, dtype=np.int64)
        seconds = median_seconds(lambda: engine.step(token, state), max(steps, 1))
    except MemcError:
        raise
    except Exception as exc:
        raise MemcError(f"the decode graph failed to step at context {context}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        engine.max_seq_len = limit
    return seconds, engine.state_bytes_at(context)
