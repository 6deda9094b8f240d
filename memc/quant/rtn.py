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


def group_params(groups: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (rounded to the stored dtype) and integer zero points for groups [..., group]."""
    if fmt.symmetric:
        half = 1 << (fmt.bits - 1)
        absmax = groups.abs().amax(-1)
        scale = absmax / max(half - 1, 1)
        zeros = torch.full_like(absmax, half)
    else:
        lo = groups.amin(-1).clamp(max=0)
        hi = groups.amax(-1).clamp(min=0)
        scale = (hi - lo) / fmt.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(_TORCH_DTYPES[fmt.scale_dtype])
    if not fmt.symmetric:
        zeros = torch.round(-lo / scale.to(torch.float32)).clamp(0, fmt.qmax)
    return scale, zeros.to(torch.uint8)


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
