"""Paired comparison of two models on the same held-out windows: Δ bits/byte with its standard error.

Both models score the same tokens, so the per-window differences cancel most of the text's own difficulty; the
standard error of a ratio estimator over windows (Σ bits / Σ bytes) says whether a Δ is measurable.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDelta:
    windows: int
    bytes: float
    bits_per_byte_a: float
    bits_per_byte_b: float
    delta: float  # b - a, bits per byte
    se: float  # paired standard error of delta
    per_byte_ppl_change: float  # 2**delta - 1 (relative change of per-byte perplexity)

    def as_dict(self) -> dict:
        return asdict(self)


def window_bits(nll: np.ndarray, spans: np.ndarray, from_position: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(bits, bytes) per window over scored tokens at positions >= ``from_position``.

    ``nll`` [windows, context - 1] nats of tokens 1..context-1; ``spans`` the same shape, bytes per token.
    """
    keep = np.arange(1, nll.shape[1] + 1) >= from_position
    return (nll[:, keep].sum(1) / math.log(2)), spans[:, keep].sum(1).astype(np.float64)


def paired_delta(nll_a: np.ndarray, nll_b: np.ndarray, spans: np.ndarray, from_position: int = 0) -> PairedDelta:
    bits_a, nbytes = window_bits(nll_a, spans, from_position)
    bits_b, _ = window_bits(nll_b, spans, from_position)
    total = float(nbytes.sum())
    a, b = float(bits_a.sum()) / total, float(bits_b.sum()) / total
    delta = b - a
    n = len(nbytes)
    resid = (bits_b - bits_a) - delta * nbytes  # ratio-estimator residuals
    se = math.sqrt(n / max(n - 1, 1) * float((resid**2).sum())) / total
    return PairedDelta(n, total, a, b, delta, se, 2.0**delta - 1.0)
