"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n.

Group scales / zero points are fixed up front from the original weight ("static groups"), so act-order only
changes the order of the sweep, never the stored layout: the result is the same codes + scales + zero points
container as RTN and lowers to the same MatMulNBits nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memc.quant.formats import Format
from memc.quant.rtn import QuantTensor, group_params, padded_groups, quantize_columns


@dataclass
class Hessian:
    """Running H = 2/n sum x x^T over the rows x of a layer's inputs [.., cols]."""

    cols: int
    h: torch.Tensor = field(init=False)
    n: int = 0

    def __post_init__(self) -> None:
        self.h = torch.zeros(self.cols, self.cols, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.cols).to(torch.float64)
        total = self.n + x.shape[0]
        self.h *= self.n / total
        self.h += (2.0 / total) * (x.T @ x)
        self.n = total


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, fmt: Format, *, damp: float = 0.01, block: int = 128,
    act_order: bool = False,
) -> QuantTensor:
    """Quantize ``w`` [rows, cols] with the Hessian [cols, cols] of its inputs."""
    rows, cols = w.shape
    W = w.detach().to(torch.float64).clone()
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # ranges chosen on the original weight, each column's error weighted by its Hessian diagonal
    importance = padded_groups(torch.diag(H).unsqueeze(0), fmt.group)  # [1, blocks, group]
    scale, zeros = group_params(padded_groups(W, fmt.group), fmt, importance)  # [rows, blocks] each
    col_group = torch.arange(cols) // fmt.group
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    s_cols = scale.to(torch.float64)[:, col_group[perm]]  # per permuted column
    z_cols = zeros.to(torch.float64)[:, col_group[perm]]
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            s, z = s_cols[:, i1 + i], z_cols[:, i1 + i]
            q = quantize_columns(col, s, z, fmt)
            Q[:, i1 + i] = q
            err = (col - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    blocks = scale.shape[1]
    full = torch.broadcast_to(zeros.to(torch.float64).unsqueeze(-1), (rows, blocks, fmt.group)).reshape(rows, -1).clone()
    full[:, :cols] = codes  # padding columns hold the zero point (they dequantize to 0)
    return QuantTensor(fmt, (rows, cols), full.to(torch.uint8), scale, zeros)
