"""The generate loop over a DecodeEngine: prefill once, then one step per new token, greedy or sampled.

``Generation`` is an iterator of new tokens (one int64 array [batch] per step) so a caller can stream text and
stop early (a stop string seen in the decoded text); it records what a deployment wants to know afterwards:
prefill seconds, every step's seconds, the final state's bytes and why it stopped. ``generate`` runs it to the
end and returns prompt + new tokens, like ``DecodeEngine.generate``.

Stop ids: a row that produced one is done and repeats that token while the other rows continue; the loop ends when
every row is done. numpy + onnxruntime only (no torch).
"""
from __future__ import annotations

import statistics
import time
from typing import Iterator, Sequence

import numpy as np

from memc.runtime.engine import DecodeEngine, DecodeStateError
from memc.runtime.sampling import Sampler, SamplingConfig

STOP_REASONS = ("max_new_tokens", "stop_id", "limit", "caller")


class Generation:
    """One generate call: ``for tokens in Generation(engine, prompt, 32): ...`` (tokens: [batch] int64).

    ``max_new_tokens`` >= 1. For an engine with a context limit (``engine.max_seq_len``, KV graphs) the prompt
    must leave room for one new token; generation stops at the limit (``stop_reason == "limit"``). Bounded-state
    engines (memory-caching graphs) have no limit.
    """

    def __init__(
        self,
        engine: DecodeEngine,
        prompt_ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_ids: Sequence[int] = (),
    ):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise DecodeStateError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        prompt = engine._ids(prompt_ids, "prompt_ids")
        self.one_row = prompt.ndim == 1
        self.prompt = prompt.reshape(1, -1) if self.one_row else prompt
        if self.prompt.ndim != 2 or self.prompt.shape[1] < 1:
            raise DecodeStateError(f"the prompt must be [seq] or [batch, seq] with seq >= 1, got {tuple(prompt.shape)}")
        self.engine = engine
        self.sampling = sampling or SamplingConfig()
        self.stop_ids = np.asarray(sorted({int(i) for i in stop_ids}), dtype=np.int64)
        limit = engine.max_seq_len
        length = self.prompt.shape[1]
        if limit is not None and length >= limit:
            raise DecodeStateError(
                f"the prompt is {length} tokens; the model's context is {limit} positions (prompt + new tokens), "
                f"so a prompt may have at most {limit - 1} tokens"
            )
        self.max_new_tokens = int(max_new_tokens) if limit is None else min(int(max_new_tokens), limit - length)
        self.capped = self.max_new_tokens < max_new_tokens
        self.tokens: list[np.ndarray] = []  # one [batch] array per new token
        self.prefill_seconds = 0.0
        self.step_seconds: list[float] = []
        self.state_bytes = 0
        self.stop_reason: str | None = None
        self._started = False

    @property
    def batch(self) -> int:
        return int(self.prompt.shape[0])

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise RuntimeError("a Generation runs once; make a new one")
        self._started = True
        self.stop_reason = "caller"  # until the loop ends on its own
        sampler = Sampler(self.sampling)
        done = np.zeros(self.batch, dtype=bool)
        last = np.zeros(self.batch, dtype=np.int64)
        t0 = time.perf_counter()
        logits, state = self.engine.prefill(self.prompt)
        self.prefill_seconds = time.perf_counter() - t0
        self.state_bytes = self.engine.state_bytes(state)
        for i in range(self.max_new_tokens):
            token = np.where(done, last, sampler(logits[:, -1]))
            if self.stop_ids.size:
                done |= np.isin(token, self.stop_ids)
            last = token
            self.tokens.append(token)
            yield token
            if self.stop_ids.size and done.all():
                self.stop_reason = "stop_id"
                return
            if i + 1 == self.max_new_tokens:
                break
            t0 = time.perf_counter()
            logits, state = self.engine.step(token, state)
            self.step_seconds.append(time.perf_counter() - t0)
            self.state_bytes = self.engine.state_bytes(state)
        self.stop_reason = "limit" if self.capped else "max_new_tokens"

    def run(self) -> np.ndarray:
        """Run to the end; prompt + new tokens ([seq] for a 1-D prompt, else [batch, seq])."""
        for _ in self:
            pass
        return self.result()

    def result(self) -> np.ndarray:
        new = np.stack(self.tokens, axis=1) if self.tokens else np.zeros((self.batch, 0), np.int64)
        out = np.concatenate([self.prompt, new], axis=1)
        return out[0] if self.one_row else out

    def timings(self) -> dict:
        """Prefill tokens/s, decode ms/token (mean and median over the steps) as plain numbers."""
        steps = self.step_seconds
        prompt = self.prompt.shape[1]
        return {
            "prefill_tokens": int(prompt),
            "prefill_s": self.prefill_seconds,
            "prefill_tokens_per_s": prompt * self.batch / self.prefill_seconds if self.prefill_seconds else None,
            "decode_steps": len(steps),
            "decode_ms_per_token": 1e3 * sum(steps) / len(steps) if steps else None,
            "decode_ms_median": 1e3 * statistics.median(steps) if steps else None,
        }


def generate(
    engine: DecodeEngine,
    prompt_ids: np.ndarray | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] = (),
) -> np.ndarray:
    """Prompt followed by up to ``max_new_tokens`` tokens (greedy unless ``sampling`` has a temperature > 0)."""
    return Generation(engine, prompt_ids, max_new_tokens, sampling, stop_ids).run()
