"""Read what an attention mask allows, from its value on probe inputs, instead of guessing from op patterns.

Every family builds its mask differently (bool vs additive float, vmap'd causal functions, sliding bands,
padding from ``attention_mask``); the allowed pattern of query -> key pairs is what they have in common.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Additive masks use -inf or finfo.min; real attention logits never come near this.
_BLOCKED_BELOW = -1e4


@dataclass(frozen=True)
class MaskInfo:
    kind: str  # none | causal | sliding | custom, plus "+padding" when rows of the batch differ
    causal: bool
    window: int | None


def allowed_pattern(value: torch.Tensor, *, blocked_true: bool = False) -> torch.Tensor:
    """A bool tensor [..., q, k]: True where the query may attend to the key.

    ``value`` is a bool mask (True = attend, as sdpa reads it; ``blocked_true`` flips it, as masked_fill reads
    it) or additive float logits/mask (blocked entries are -inf or hugely negative).
    """
    if value.dtype == torch.bool:
        return ~value if blocked_true else value
    return value > _BLOCKED_BELOW


def classify(allowed: torch.Tensor) -> MaskInfo:
    """Name the pattern of a [..., q, k] allowed-mask (leading dims broadcast over batch and heads)."""
    a = allowed.reshape(-1, *allowed.shape[-2:]) if allowed.ndim >= 2 else allowed.reshape(1, 1, -1)
    q, k = a.shape[-2:]
    base = a[0]
    padding = bool((a != base).any())
    if q != k:
        return MaskInfo("custom" + ("+padding" if padding else ""), False, None)
    tril = torch.ones(q, k, dtype=torch.bool).tril()
    if bool(base.all()):
        return MaskInfo("padding" if padding else "none", False, None)
    suffix = "+padding" if padding else ""
    if torch.equal(base, tril):
        return MaskInfo("causal" + suffix, True, None)
    width = int(base.sum(-1).max())
    band = tril & ~torch.ones(q, k, dtype=torch.bool).tril(-width)
    if torch.equal(base, band):
        return MaskInfo("sliding" + suffix, True, width)
    return MaskInfo("custom" + suffix, bool((base & ~tril).sum() == 0), None)
