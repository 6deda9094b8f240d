"""The format catalogue: what each weight format stores, its exact byte cost per tensor shape, and which targets
can store it.

A format name is ``keep`` (the tensor stays in the program's float dtype) or ``int{bits}-g{group}`` with optional
suffixes ``-sym`` (symmetric: no zero points; the code offset is 2^(bits-1)) and ``-s32`` (float32 scales instead
of float16). Groups run along the input axis of a linear weight [out, in] (the hidden axis of an embedding
[vocab, hidden]), which is the layout onnxruntime's MatMulNBits and GatherBlockQuantized read:

* codes: uint8 [rows, blocks, group * bits / 8], LSB first along the input axis (the last block zero-padded);
* scales: [rows, blocks] in the scale dtype (float16 scales are stored as float16 and cast once at load);
* zero points (affine only): uint8 [rows, ceil(blocks * bits / 8)], packed the same way.

So a tensor's bytes are exactly what the ONNX initializers hold. onnxruntime's CPU kernels take 2, 4 and 8 bits
(3, 5, 6 and 7 fail at session creation), so a 3-bit format exists for torch evaluation and the "dense" cost model
but the onnx target refuses it before writing anything.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from memc.errors import ConfigError, UnsupportedError

_NAME = re.compile(r"^int(?P<bits>[2-8])-g(?P<group>\d+)(?P<sym>-sym)?(?P<s32>-s32)?$")
FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class TargetRules:
    """What a target can store: bit widths, group sizes, symmetric/affine, scale dtypes."""

    name: str
    bits: frozenset[int]
    min_group: int
    power_of_two_group: bool
    affine: bool
    scale_dtypes: frozenset[str]
    why: str  # said when a format is refused

    def refusal(self, fmt: "Format") -> str | None:
        if fmt.keep:
            return None
        if fmt.bits not in self.bits:
            return f"{self.why}: bits {sorted(self.bits)} only, not {fmt.bits}"
        if fmt.group < self.min_group or (self.power_of_two_group and fmt.group & (fmt.group - 1)):
            return f"{self.why}: the group size must be a power of two >= {self.min_group}, not {fmt.group}"
        if not fmt.symmetric and not self.affine:
            return f"{self.why}: symmetric formats only (use the -sym suffix)"
        if fmt.scale_dtype not in self.scale_dtypes:
            return f"{self.why}: scales in {sorted(self.scale_dtypes)} only"
        return None


TARGETS: dict[str, TargetRules] = {
    "onnx": TargetRules(
        "onnx", frozenset({2, 4, 8}), 16, True, True, frozenset({"float16", "float32"}),
        "onnxruntime CPU MatMulNBits / GatherBlockQuantized",
    ),
    # TensorRT explicit quantization: symmetric weight-only INT4 blocks and INT8 (see shared/design/quant.md)
    "tensorrt": TargetRules(
        "tensorrt", frozenset({4, 8}), 16, True, False, frozenset({"float16", "float32"}),
        "TensorRT explicit quantization (DequantizeLinear, zero point 0)",
    ),
    # densely packed codes, any width: the torch fake-quant program and the ideal cost other tools quote
    "dense": TargetRules("dense", frozenset(range(2, 9)), 1, False, True, frozenset({"float16", "float32"}), "dense"),
}


@dataclass(frozen=True)
class Format:
    name: str
    bits: int = 0  # 0: keep
    group: int = 0
    symmetric: bool = False
    scale_dtype: str = "float16"

    @property
    def keep(self) -> bool:
        return self.bits == 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def container_bits(self) -> int:
        """Bits per code in the packed layout: codes are packed LSB-first in bytes, so widths that do not divide
        8 (3, 5, 6, 7) occupy the next width that does (3 -> 4, 5..7 -> 8) in the ONNX-style layout."""
        return next(b for b in (1, 2, 4, 8) if b >= self.bits)

    def blocks(self, cols: int) -> int:
        return math.ceil(cols / self.group)

    def nbytes(self, shape: tuple[int, ...], target: str = "onnx", float_dtype: str = "float32") -> int:
        """Exact bytes of this tensor in ``target``'s container (``keep``: rows x cols x the float dtype)."""
        numel = math.prod(shape)
        if self.keep:
            return numel * FLOAT_BYTES[float_dtype]
        refused = TARGETS[target].refusal(self)
        if refused:
            raise UnsupportedError(f"format {self.name!r} cannot be stored by the {target} target ({refused})")
        rows, cols = _rows_cols(shape)
        blocks = self.blocks(cols)
        scale = rows * blocks * FLOAT_BYTES[self.scale_dtype]
        if target == "dense":
            codes = math.ceil(rows * cols * self.bits / 8)
            zeros = 0 if self.symmetric else math.ceil(rows * blocks * self.bits / 8)
        else:
            codes = rows * blocks * (self.group * self.container_bits // 8)
            zeros = 0 if self.symmetric else rows * math.ceil(blocks * self.container_bits / 8)
        return codes + scale + zeros

    def accepted_by(self, target: str) -> bool:
        return TARGETS[target].refusal(self) is None

    def __str__(self) -> str:
        return self.name


KEEP = Format("keep")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"quantized formats apply to 2-D weights, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def parse_format(name: str, path: str = "format") -> Format:
    """``keep`` | ``int{2..8}-g{group}[-sym][-s32]``; anything else is a ConfigError naming ``path``."""
    if name == "keep":
        return KEEP
    m = _NAME.match(name)
    if not m or int(m["group"]) < 1:
        raise ConfigError(
            f"{path}: unknown format {name!r}; expected 'keep' or int<bits>-g<group>[-sym][-s32] with bits 2..8, "
            "e.g. 'int4-g128', 'int2-g32', 'int8-g128-sym'"
        )
    return Format(name, int(m["bits"]), int(m["group"]), bool(m["sym"]), "float32" if m["s32"] else "float16")


def check_target(fmt: Format, target: str, tensor: str) -> None:
    """Refuse, naming the tensor and the format, a format the target cannot store."""
    refused = TARGETS[target].refusal(fmt)
    if refused:
        raise UnsupportedError(
            f"tensor {tensor!r}: format {fmt.name!r} cannot be stored by the {target} target ({refused})",
            hint="choose formats with 2, 4 or 8 bits and power-of-two groups >= 16 for onnxruntime",
        )
