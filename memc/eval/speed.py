"""Prefill throughput and per-token decode latency, as medians over repeats after a warm-up.

The captured graphs carry no KV cache (capture pins ``use_cache=False``), so decode here is *recompute* decode: one
forward over the whole prefix per new token. That is the honest cost of the current artifacts; a stateful decode
graph is measured separately where it exists.
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
        start = max(context - decode_steps, 1)

        def decode() -> None:
            for t in range(start, context):
                backend.forward(_feeds(backend, ids[:, : t + 1]))

        decode_s = median_seconds(decode, max(repeats // 2, 1)) / max(context - start, 1)
        points.append(SpeedPoint(context, context / prefill, prefill * 1e3, decode_s * 1e3))
    return points
