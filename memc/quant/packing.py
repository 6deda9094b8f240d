"""Packing integer codes LSB-first into bytes (the onnxruntime MatMulNBits / GatherBlockQuantized layout)."""
from __future__ import annotations

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2^bits, bits in 1/2/4/8) -> uint8 [..., ceil(n * bits / 8)]."""
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).view(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [..., m] -> uint8 codes [..., n]."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.flatten(-2)[..., :n].to(torch.uint8)
