"""Round-to-nearest quantization, group-wise along the input axis, affine or symmetric; and the quantized-tensor
value that every quantizer returns (codes + scales + zero points, its fake-quant weight and its packed form)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memc.quant.formats import Format
from memc.quant.packing import pack_codes

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantTensor:
    """A quantized 2-D weight [rows, cols]: ``w ~= (codes - zeros) * scales`` per group of ``fmt.group`` columns.

    ``codes`` uint8 [rows, blocks * group] (the padding columns are code == zero point, i.e. 0.0), ``scales``
    [rows, blocks] in the format's scale dtype, ``zeros`` uint8 [rows, blocks] (2^(bits-1) for symmetric formats).
    """

    fmt: Format
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.fmt.group, self.shape[1]).to(dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        """The stored form: ``codes`` [rows, blocks, group*bits/8], ``scales``, and ``zeros`` unless symmetric."""
        bits = self.fmt.container_bits
        rows, blocks = self.scales.shape
        out = {
            "codes": pack_codes(self.codes, bits).view(rows, blocks, -1),
            "scales": self.scales.clone(),
        }
        if not self.fmt.symmetric or bits != self.fmt.bits:  # a 3-bit code's offset 4 is not the container's 8
            out["zeros"] = pack_codes(self.zeros, bits)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed().values())


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """float32 [rows, cols] from codes [rows, blocks*group], scales / zeros [rows, blocks]."""
    rows, blocks = scales.shape
    q = codes.view(rows, blocks, group).to(torch.float32) - zeros.to(torch.float32).unsqueeze(-1)
    return (q * scales.to(torch.float32).unsqueeze(-1)).view(rows, blocks * group)[:, :cols]


def padded_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, cols] -> [rows, blocks, group], zero-padding the last block."""
    rows, cols = w.shape
    pad = (-cols) % group
    return torch.nn.functional.pad(w.to(torch.float32), (0, pad)).view(rows, -1, group)


# Each group's range is shrunk by the factor in SHRINK that minimises its (importance-weighted) squared rounding +
# clipping error: a min/max range wastes code levels on outliers, which costs most at 2-3 bits (the clip search of
# AWQ / llama.cpp / HQQ-style quantizers). 1.0 comes first, so a tie keeps the full range.
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
RANGE_RULE = "mse-shrink-v1"  # part of every cache key that depends on how ranges are chosen


def _range_params(groups: torch.Tensor, fmt: Format, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (in the stored dtype) and float zero point of groups [..., group] for one range shrink factor."""
    if fmt.symmetric:
        half = 1 << (fmt.bits - 1)
        scale = groups.abs().amax(-1) * shrink / max(half - 1, 1)
        zeros = torch.full_like(scale, float(half))
    else:
        lo = groups.amin(-1).clamp(max=0) * shrink
        hi = groups.amax(-1).clamp(min=0) * shrink
        scale = (hi - lo) / fmt.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(_TORCH_DTYPES[fmt.scale_dtype])
    if not fmt.symmetric:
        zeros = torch.round(-lo / scale.to(torch.float32)).clamp(0, fmt.qmax)
    return scale, zeros


def group_params(groups: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (rounded to the stored dtype) and integer zero points for groups [..., group]: per group, the range
    (min/max, or absmax if symmetric) shrunk by the SHRINK factor with the least squared error, each column weighted
    by ``importance`` (broadcastable to ``groups``, e.g. GPTQ's Hessian diagonal; None = uniform)."""
    g = groups.to(torch.float32)
    best_scale, best_zeros, best_err = None, None, None
    for shrink in SHRINK:
        scale, zeros = _range_params(g, fmt, shrink)
        s, z = scale.to(torch.float32).unsqueeze(-1), zeros.unsqueeze(-1)
        err = (g - (torch.clamp(torch.round(g / s) + z, 0, fmt.qmax) - z) * s).square()
        err = (err if importance is None else err * importance).sum(-1)
        if best_err is None:
            best_scale, best_zeros, best_err = scale, zeros, err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zeros = torch.where(better, zeros, best_zeros)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zeros.to(torch.uint8)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes (as float) of values ``w`` [..., n] with per-row scale / zero broadcast from [..., 1] or [...]."""
    s = scale.to(torch.float32)
    z = zeros.to(torch.float32)
    return torch.clamp(torch.round(w / s) + z, 0, fmt.qmax)


def rtn(w: torch.Tensor, fmt: Format) -> QuantTensor:
    """Round-to-nearest: each group's scale from its range (affine) or absolute maximum (symmetric)."""
    groups = padded_groups(w, fmt.group)
    scale, zeros = group_params(groups, fmt)
    codes = quantize_columns(groups, scale.unsqueeze(-1), zeros.unsqueeze(-1), fmt)
    rows = w.shape[0]
    return QuantTensor(fmt, tuple(w.shape), codes.to(torch.uint8).view(rows, -1), scale, zeros)
