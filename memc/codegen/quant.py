"""ONNX lowering of memc's quantized ops (memc.nn.quant_linear) to onnxruntime's com.microsoft kernels.

``memc::matmul_nbits`` -> ``MatMulNBits`` and ``memc::gather_nbits`` -> ``GatherBlockQuantized``, both reading the
module's buffers as initializers unchanged, so an embedding tied to the LM head is one set of initializers. The
exporter's optimizer folds the float16 -> float32 Cast of the scales into a float32 initializer;
``store_half_scales`` puts float16 scales back (with one Cast each) so the file holds the bytes the format promised.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.defs import OpSchema

MSFT = "com.microsoft"
QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized")


def _register_schemas() -> None:
    """onnx has no schemas for contrib ops; the exporter's builder needs them to type the nodes."""
    fp, opt, attr = OpSchema.FormalParameter, OpSchema.FormalParameterOption, OpSchema.Attribute
    ints = OpSchema.AttrType.INT
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = [
        OpSchema(
            "MatMulNBits", MSFT, 1,
            inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"), fp("zero_points", "T3", param_option=opt.Optional),
                    fp("g_idx", "T4", param_option=opt.Optional), fp("bias", "T1", param_option=opt.Optional)],
            outputs=[fp("Y", "T1")],
            type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"] + floats, ""),
                              ("T4", ["tensor(int32)"], "")],
            attributes=[attr(n, ints, "") for n in ("K", "N", "bits", "block_size", "accuracy_level")],
        ),
        OpSchema(
            "GatherBlockQuantized", MSFT, 1,
            inputs=[fp("data", "T1"), fp("indices", "Tind"), fp("scales", "T2"),
                    fp("zero_points", "T1", param_option=opt.Optional)],
            outputs=[fp("output", "T2")],
            type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", floats, ""), ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
            attributes=[attr(n, ints, "") for n in ("gather_axis", "quantize_axis", "block_size", "bits")],
        ),
    ]
    for s in schemas:
        try:
            onnx.defs.get_schema(s.name, 1, MSFT)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(s)


def translations() -> dict:
    """torch op -> onnxscript translation, for ``torch.onnx.export(custom_translation_table=...)``."""
    import memc.nn.quant_linear  # noqa: F401  (defines the torch ops)
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_schemas()
    msft = Opset(MSFT, 1)

    def matmul_nbits(x, codes, scales, zeros, k: int, bits: int, block: int, accuracy_level: int):
        n = codes.shape[0]
        s = op.Cast(scales, to=onnx.TensorProto.FLOAT)
        return msft.MatMulNBits(x, codes, s, zeros, K=k, N=n, bits=bits, block_size=block,
                                accuracy_level=accuracy_level)

    def gather_nbits(codes, scales, zeros, ids, k: int, bits: int, block: int):
        rows, blocks, blob = codes.shape
        data = op.Reshape(codes, op.Constant(value_ints=[rows, blocks * blob]))
        s = op.Cast(scales, to=onnx.TensorProto.FLOAT)
        out = msft.GatherBlockQuantized(data, ids, s, zeros, gather_axis=0, quantize_axis=1, block_size=block,
                                        bits=bits)
        if blocks * block != k:
            out = op.Slice(out, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), op.Constant(value_ints=[-1]))
        return out

    return {torch.ops.memc.matmul_nbits.default: matmul_nbits, torch.ops.memc.gather_nbits.default: gather_nbits}


def store_half_scales(model: onnx.ModelProto) -> int:
    """Float32 scale initializers of the quantized ops whose values are float16 numbers become float16 + Cast.

    Returns the bytes saved. Scales of ``-s32`` formats are float32 values and stay as they are.
    """
    inits = {t.name: t for t in model.graph.initializer}
    targets = {n.input[2] for n in model.graph.node if n.domain == MSFT and n.op_type in QUANT_OPS and len(n.input) > 2}
    saved = 0
    casts = []
    for name in sorted(targets):
        t = inits.get(name)
        if t is None or t.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(t)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        half_name = f"{name}_f16"
        model.graph.initializer.remove(t)
        model.graph.initializer.append(numpy_helper.from_array(half, half_name))
        casts.append(onnx.helper.make_node("Cast", [half_name], [name], to=onnx.TensorProto.FLOAT, name=f"{name}_cast"))
        saved += values.nbytes - half.nbytes
    for c in reversed(casts):
        model.graph.node.insert(0, c)
    return saved


def share_reshaped_initializers(model: onnx.ModelProto, min_bytes: int = 1024) -> int:
    """Packed codes / zero points (uint8) and float16 scales with the same bytes as an earlier initializer are stored
    once: the exporter folds ``Reshape(codes)`` of a tied table into a second copy, and the table's scales reach its
    two ops through two folded Casts. A same-shape duplicate is replaced by the first; another shape becomes a
    Reshape of it. Float32 initializers (ordinary weights) are left alone. Returns the bytes saved."""
    kinds = (onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16)
    first: dict[tuple[int, bytes], tuple[onnx.TensorProto, tuple]] = {}
    saved = 0
    reshapes, alias = [], {}
    for t in list(model.graph.initializer):
        if t.data_type not in kinds:
            continue
        raw = numpy_helper.to_array(t)
        if raw.nbytes < min_bytes:
            continue
        kept, shape = first.setdefault((t.data_type, raw.tobytes()), (t, raw.shape))
        if kept is t:
            continue
        model.graph.initializer.remove(t)
        saved += raw.nbytes
        if shape == raw.shape:
            alias[t.name] = kept.name
            continue
        shape_name = f"{t.name}_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(raw.shape, np.int64), shape_name))
        reshapes.append(onnx.helper.make_node("Reshape", [kept.name, shape_name], [t.name], name=f"{t.name}_shared"))
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    for r in reversed(reshapes):
        model.graph.node.insert(0, r)
    return saved
