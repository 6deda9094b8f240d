"""Prefill throughput and per-token decode latency, as medians over repeats after a warm-up.

``model.onnx`` carries no KV cache (capture pins ``use_cache=False``), so its decode is *recompute* decode: one
forward over the whole prefix per new token. When the artifact also has ``decode.onnx`` (``[target] decode_graph``),
decode is measured the way it deploys: the DecodeEngine prefills ``context - 1`` tokens, then single steps are timed
from that state (``decode_mode = "kv-state"``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from memc.eval.backends import Backend
from memc.eval.perplexity import check_context


@dataclass
class SpeedPoint:
    context: int
    prefill_tokens_per_s: float
    prefill_ms: float
    decode_ms_per_token: float
    decode_mode: str = "recompute"

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


def speed(backend: Backend, contexts: list[int], repeats: int = 5, decode_steps: int = 4, seed: int = 0) -> list[SpeedPoint]:
    rng = np.random.default_rng(seed)
    vocab = backend.info.vocab_size or 2
    points = []
    for context in contexts:
        check_context(backend, context)
        ids = rng.integers(0, vocab, size=(1, context), dtype=np.int64)
        prefill = median_seconds(lambda: backend.forward(_feeds(backend, ids)), repeats)
        if backend.decode_graph is not None:
            decode_s, mode = _kv_state_step_seconds(backend.decode_graph, ids, repeats), "kv-state"
        else:
            decode_s, mode = _recompute_step_seconds(backend, ids, repeats, decode_steps), "recompute"
        points.append(SpeedPoint(context, context / prefill, prefill * 1e3, decode_s * 1e3, mode))
    return points


def _recompute_step_seconds(backend: Backend, ids: np.ndarray, repeats: int, steps: int) -> float:
    context = ids.shape[1]
    start = max(context - steps, 1)

    def decode() -> None:
        for t in range(start, context):
            backend.forward(_feeds(backend, ids[:, : t + 1]))

    return median_seconds(decode, max(repeats // 2, 1)) / max(context - start, 1)


def _kv_state_step_seconds(decode_graph, ids: np.ndarray, repeats: int) -> float:
    from memc.runtime.engine import DecodeEngine

    engine = DecodeEngine(decode_graph, threads=1)
    _, state = engine.prefill(ids[:, :-1])
    return median_seconds(lambda: engine.step(ids[:, -1], state), max(repeats, 3))
