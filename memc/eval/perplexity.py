"""Perplexity and bits per byte of a causal LM on held-out text, in non-overlapping windows of ``context``.

Each window's first token has no context and is not scored; every other token is predicted from the tokens
before it inside its window. Bits per byte divides the total bits by the UTF-8 bytes those scored tokens span
(exactly, from each token's byte length; one byte per token for byte-level models).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from memc.errors import MemcError
from memc.eval.backends import Backend


@dataclass
class PerplexityResult:
    context: int
    windows: int
    tokens_scored: int
    bytes_scored: float
    nll_per_token: float  # nats
    perplexity: float
    bits_per_byte: float

    def as_dict(self) -> dict:
        return asdict(self)


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood (nats), computed in float64 for stable sums."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    picked = np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def window_nll(backend: Backend, windows: np.ndarray, batch: int = 1) -> np.ndarray:
    """NLL (nats) of every scored token: [windows, context - 1]; token j+1 of a window is predicted from 0..j."""
    rows = []
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        logits = backend.forward({"input_ids": ids})
        rows.append(log_softmax_nll(logits[:, :-1], ids[:, 1:]))
    return np.concatenate(rows, axis=0)


def check_context(backend: Backend, context: int) -> None:
    limit = backend.info.max_seq_len
    if context < 2:
        raise MemcError(f"context {context} is too short; use >= 2")
    if limit is not None and context > limit:
        raise MemcError(f"context {context} is longer than the model supports ({limit} tokens)")


def perplexity(
    backend: Backend, tokens: np.ndarray, context: int, *, token_bytes: np.ndarray | None = None,
    max_windows: int | None = None, batch: int = 1,
) -> PerplexityResult:
    """`token_bytes[i]`: the bytes token i spans (default: one each)."""
    if backend.info.task != "causal-lm":
        raise MemcError("perplexity needs a causal LM; this model is an encoder (use --embeddings)")
    check_context(backend, context)
    n = len(tokens) // context
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise MemcError(f"the text has {len(tokens)} tokens; one window of context {context} needs at least {context}")
    windows = tokens[: n * context].reshape(n, context)
    total = float(window_nll(backend, windows, batch).sum())
    scored = n * (context - 1)
    spans = np.ones(n * context) if token_bytes is None else np.asarray(token_bytes[: n * context], np.float64)
    scored_bytes = float(spans.reshape(n, context)[:, 1:].sum())
    nll = total / scored
    return PerplexityResult(
        context, n, scored, scored_bytes, nll, math.exp(nll), total / math.log(2) / scored_bytes,
    )
