"""benchmarks/quant_prefill.py: the accuracy-level copies are what the quantize pass would lower (per format at -1),
and the toolchain's pass indices are found by name."""
from __future__ import annotations

import onnx
import pytest

import benchmarks.quant_prefill as qp
from tests.codegen.test_fusion_nbits import _model, _nbits


def test_with_level_sets_what_the_pass_would(tmp_path) -> None:
    parts = [_nbits("a", "x", 16, bits=4, block=16), _nbits("b", "x", 16, bits=2, block=128, seed=1, k=128),
             _nbits("c", "x", 16, bits=8, block=16, seed=2)]  # the graph is only rewritten, never run
    src = tmp_path / "m.onnx"
    onnx.save_model(_model(parts, ["a", "b", "c"]), str(src))

    def levels(path):
        return {n.output[0]: next(a.i for a in n.attribute if a.name == "accuracy_level")
                for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"}

    path, counts = qp.with_level(src, tmp_path / "auto.onnx", -1)
    assert levels(path) == {"a": 4, "b": 0, "c": 4} and counts == {4: 2, 0: 1}  # 2-bit g128: no fast int8 kernel
    path, counts = qp.with_level(src, tmp_path / "l4.onnx", 4)
    assert levels(path) == {"a": 4, "b": 4, "c": 4} and counts == {4: 3}
    assert levels(src) == {"a": 0, "b": 0, "c": 0}  # the source is left alone


def test_pipeline_index_names_the_pass() -> None:
    assert qp.pipeline_index("allocate-bits") < qp.pipeline_index("quantize")
    with pytest.raises(SystemExit, match="no 'prune-experts' pass"):
        qp.pipeline_index("prune-experts")
