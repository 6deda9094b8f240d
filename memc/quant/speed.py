"""MatMulNBits accuracy level per weight format, by measurement: which onnxruntime CPU kernel is fastest for it.

``accuracy_level`` 4 computes with int8 activations (VNNI / AVX-512 where present); 0 dequantizes to float32. Which
one is faster depends on bits, block size, the CPU and the onnxruntime version, so the choice is a measured table,
not a rule. Measured with one MatMulNBits node vs fp32 MatMul on ref-llama shapes (K x N = 256 x 256, 256 x 768,
768 x 256), one thread, min ms of 21 / 41 runs in turns, onnxruntime 1.32.0, AMD EPYC with AVX-512 (VNNI, BF16),
shared machine (load ~6 on 2 cores); M = 1024 prefill rows / M = 1 decode step, 256 x 768:

| format        | fp32 MatMul   | level 0        | level 1        | level 4        |
|---------------|---------------|----------------|----------------|----------------|
| int8-g128     | 3.66 / 0.018  | 4.00 / 0.221   | 3.98 / 0.218   | **2.88 / 0.027** |
| int4-g128     |               | 3.85 / 0.030   | 3.74 / 0.029   | **3.00 / 0.022** |
| int4-g32      |               | 3.96           | 3.85           | **3.82**       |
| int2-g32      |               | 4.56 / 0.580   | **4.35** / 0.583 | 6.98 / **0.022** |
| int2-g64      |               | 4.55           | 4.47           | **4.20**       |
| int2-g128     |               | 4.28           | 4.45           | 4.96           |
| int2-g256     |               | **4.37** / 0.579 | 4.36 / 0.580 | 4.38 / 0.576   |

So 4- and 8-bit take level 4 (faster at both M); 2-bit has no fast int8 prefill kernel here (every level is ~1.2x
fp32 at M = 1024); block 32 has a fast int8 step kernel (25x faster at M = 1, prefill 1.5x slower) and block 64's
int8 prefill was the fastest in all three shapes, so 2-bit blocks <= 64 take level 4; larger blocks take 0 (exact;
block 128 at level 4 was slower in two of three shapes, block 256 no faster anywhere). Level 4 changes the numbers: ref-llama logits differ
from the float32-compute artifact by max |Δ| ~0.5 (top-1 agreement 97-99% on 1024 random tokens), so an artifact
lowered this way needs a larger ``target.atol`` and its quality measured on the artifact, not the torch program.
"""
from __future__ import annotations

from memc.quant.formats import Format

AUTO = -1  # QuantizeOptions.accuracy_level: choose per format from MEASURED


def measured_level(fmt: Format) -> int:
    """The accuracy level measured fastest for ``fmt`` (onnxruntime 1.32 CPU, AVX-512 VNNI; see the table above)."""
    if fmt.bits in (4, 8):
        return 4
    if fmt.bits == 2 and fmt.group <= 64:
        return 4
    return 0


def level_for(fmt: Format, accuracy_level: int) -> int:
    """``accuracy_level`` as given, or the measured one for ``fmt`` when it is AUTO."""
    return measured_level(fmt) if accuracy_level == AUTO else accuracy_level
