"""Next-token choice from logits: greedy (temperature 0) or sampled with temperature, top-k and top-p, seeded.

numpy only (no torch), so a deployment process stays small. The filters follow the order and tie rules of
transformers' logits warpers, so a sampled run means the same thing as ``model.generate(do_sample=True, ...)``:

1. temperature: logits / T (T = 0 is greedy: argmax, the filters do not apply);
2. top-k: keep every token whose logit is >= the k-th largest (ties at the boundary are kept);
3. top-p: of what is left, renormalised, keep the most probable tokens until their probability mass reaches p
   (a token is kept when the mass strictly before it, in descending order, is < p; the top token always stays).

Each row of a batch is drawn independently from one seeded generator, one uniform number per row per step in row
order, so the same seed, logits and batch give the same tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from memc.errors import MemcError


class SamplingError(MemcError, ValueError):
    """A sampling option out of range (the message names the option)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``temperature`` 0 = greedy; ``top_k`` 0 and ``top_p`` 1 = no filter."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t < 0:
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise SamplingError(f"top_k must be an int >= 0 (0 = no top-k filter), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = no top-p filter), got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise SamplingError(f"seed must be an int >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


def _rows(logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.floating):
        raise SamplingError(f"logits must be a float array [batch, vocab], got {arr.dtype} {tuple(arr.shape)}")
    return arr


def probabilities(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The distribution sampling draws from: float64 [batch, vocab], zero outside the kept tokens, rows sum to 1.

    Greedy (temperature 0) puts all mass on the first largest logit.
    """
    x = _rows(logits).astype(np.float64)
    batch, vocab = x.shape
    if config.greedy:
        probs = np.zeros_like(x)
        probs[np.arange(batch), x.argmax(-1)] = 1.0
        return probs
    x = x / config.temperature
    if 0 < config.top_k < vocab:
        kth = np.partition(x, vocab - config.top_k, axis=-1)[:, vocab - config.top_k][:, None]
        x = np.where(x >= kth, x, -np.inf)
    x = x - x.max(-1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(-1, keepdims=True)
    if config.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass strictly ahead of each token
        keep_sorted = before < config.top_p
        keep_sorted[:, 0] = True
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return probs


class Sampler:
    """``sampler(logits [batch, vocab]) -> tokens [batch]`` (int64), seeded once at construction."""

    def __init__(self, config: SamplingConfig | None = None):
        self.config = config or SamplingConfig()
        self.rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.config.greedy:
            return _rows(logits).argmax(-1).astype(np.int64)
        probs = probabilities(logits, self.config)
        u = self.rng.random(probs.shape[0])
        cdf = np.cumsum(probs, -1)
        total = cdf[:, -1]
        # the first token whose cumulative mass exceeds u * total: it has mass (zero-mass tokens repeat the previous
        # cumulative value); u * total is kept below total, where rounding could otherwise put it
        v = np.minimum(u * total, np.nextafter(total, 0))
        return (cdf <= v[:, None]).sum(-1).astype(np.int64)
