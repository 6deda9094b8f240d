"""Hedgehog feature map phi(x) = [softmax(x W) ++ softmax(-x W)], one W per head (Zhang et al. 2024, LoLCATs).

The map is strictly positive, so a linear-attention read phi(q)^T S / phi(q)^T z has a positive denominator and
a one-token segment reads back exactly its value, whatever W is (the segment == 1 sanity property).
"""
from __future__ import annotations

import torch
from torch import nn


class HedgehogFeatureMap(nn.Module):
    """``phi(x) = [softmax(x W_h) ++ softmax(-x W_h)]`` per head h: [B, H, T, D] -> [B, H, T, F], W_h [D, F/2].

    ``W`` starts as the identity when F/2 == D (phi(q)^T phi(k) then already grows with q.k), otherwise as a fixed
    seeded projection (seed 0, N(0, 1/D)), so the same config always gives the same initial layer.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        half = feature_dim // 2
        if half == head_dim:
            init = torch.eye(head_dim).expand(num_heads, head_dim, half).clone()
        else:
            gen = torch.Generator().manual_seed(0)
            init = torch.randn(num_heads, head_dim, half, generator=gen) / head_dim**0.5
        self.weight = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype))
        return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1)
