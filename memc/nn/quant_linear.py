"""Quantized linear and embedding modules over packed weights, and the two torch ops they call.

The buffers hold exactly what the ONNX artifact stores (memc.quant.formats): packed codes [rows, blocks, blob],
scales [rows, blocks] (float16 or float32), packed zero points (affine formats). ``memc::matmul_nbits`` and
``memc::gather_nbits`` unpack and dequantize in plain torch (the reference every lowering is tested against);
memc.codegen.quant lowers them to onnxruntime's MatMulNBits / GatherBlockQuantized. An embedding tied to the LM
head shares one ``QuantizedWeight``, so the artifact stores it once.
"""
from __future__ import annotations

from typing import Optional

import torch

from memc.quant.formats import Format, parse_format
from memc.quant.packing import unpack_codes
from memc.quant.rtn import QuantTensor, dequantize


def _dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], cols: int, bits: int,
             block: int) -> torch.Tensor:
    rows, blocks = scales.shape
    q = unpack_codes(codes.reshape(rows, -1), bits, blocks * block)
    z = unpack_codes(zeros, bits, blocks) if zeros is not None else torch.full_like(scales, 1 << (bits - 1), dtype=torch.uint8)
    return dequantize(q, scales, z, block, cols)


@torch.library.custom_op("memc::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], k: int,
                 bits: int, block: int, accuracy_level: int) -> torch.Tensor:
    """x [..., k] @ W^T with W [n, k] = dequantized (codes, scales, zeros). ``accuracy_level`` only matters to the
    onnxruntime kernel (0: float32 compute, exact; 4: int8 activations, faster)."""
    return x @ _dequant(codes, scales, zeros, k, bits, block).to(x.dtype).T


@matmul_nbits.register_fake
def _(x, codes, scales, zeros, k, bits, block, accuracy_level):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("memc::gather_nbits", mutates_args=())
def gather_nbits(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], ids: torch.Tensor, k: int,
                 bits: int, block: int) -> torch.Tensor:
    """Rows ``ids`` of the dequantized table [rows, k] (float32)."""
    return torch.nn.functional.embedding(ids, _dequant(codes, scales, zeros, k, bits, block))


@gather_nbits.register_fake
def _(codes, scales, zeros, ids, k, bits, block):
    return scales.new_empty(*ids.shape, k, dtype=torch.float32)


class QuantizedWeight(torch.nn.Module):
    """One quantized tensor's stored form; ``fmt`` names its format (memc.quant.formats)."""

    def __init__(self, q: QuantTensor, tensor_name: str = ""):
        super().__init__()
        self.tensor_name = tensor_name  # the original parameter's name, for reports and errors
        self.fmt: Format = q.fmt
        self.rows, self.cols = q.shape
        packed = q.packed()
        for name in ("codes", "scales", "zeros"):
            self.register_buffer(name, packed.get(name))

    @property
    def bits(self) -> int:
        return self.fmt.container_bits

    def dequantize(self) -> torch.Tensor:
        return _dequant(self.codes, self.scales, self.zeros, self.cols, self.bits, self.fmt.group)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, shape=({self.rows}, {self.cols}), {self.nbytes()} bytes"


class QuantLinear(torch.nn.Module):
    """``y = x W^T + b`` with W quantized; replaces an ``aten.linear`` call."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, accuracy_level: int = 0):
        super().__init__()
        self.qweight = qweight
        self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self.accuracy_level = accuracy_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight
        y = torch.ops.memc.matmul_nbits(x, w.codes, w.scales, w.zeros, w.cols, w.bits, w.fmt.group, self.accuracy_level)
        return y + self.bias if self.bias is not None else y


class QuantEmbedding(torch.nn.Module):
    """Rows of a quantized table; replaces an ``aten.embedding`` call."""

    def __init__(self, qweight: QuantizedWeight):
        super().__init__()
        self.qweight = qweight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.qweight
        return torch.ops.memc.gather_nbits(w.codes, w.scales, w.zeros, ids, w.cols, w.bits, w.fmt.group)


def format_of(module: torch.nn.Module) -> Format | None:
    q = getattr(module, "qweight", None)
    return q.fmt if isinstance(q, QuantizedWeight) else None


__all__ = ["QuantizedWeight", "QuantLinear", "QuantEmbedding", "matmul_nbits", "gather_nbits", "parse_format"]
