"""A hand-written model whose forward() does work on weights alone: what fold-constants removes.

Run from this directory (memc imports factories from the current directory):

    memc compile demo_model:build -c toolchain-fold.toml -o out/fold-demo

``w_in`` is stored [in, out] and transposed and rescaled on every call; ``w_out`` is transposed on every call.
After fold-constants both are single pre-computed constants, and the original weights are gone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ScaledMLP(torch.nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in = torch.nn.Parameter(torch.randn(dim, hidden, generator=g) / dim**0.5)  # [in, out]
        self.log_scale = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=g))
        self.w_out = torch.nn.Parameter(torch.randn(hidden, dim, generator=g) / hidden**0.5)  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_in = self.w_in.t() * self.log_scale.exp()[:, None]  # weights only: folded into one constant
        return F.linear(F.gelu(F.linear(x, w_in)), self.w_out.t())  # w_out.t(): folded too


def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """memc factory: the model and example inputs (batch 2, 8 tokens, width 64)."""
    return ScaledMLP(), (torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1)),)
