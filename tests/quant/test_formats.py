"""The format catalogue: names, exact bytes in the onnx container, which targets accept what."""
import pytest
import torch

from memc.errors import ConfigError, UnsupportedError
from memc.quant.formats import KEEP, check_target, parse_format
from memc.quant.rtn import rtn


def test_parse_names():
    f = parse_format("int4-g128")
    assert (f.bits, f.group, f.symmetric, f.scale_dtype) == (4, 128, False, "float16")
    f = parse_format("int8-g64-sym-s32")
    assert (f.bits, f.group, f.symmetric, f.scale_dtype) == (8, 64, True, "float32")
    assert parse_format("keep") is KEEP
    for bad in ("int4", "int9-g128", "fp4-g32", "int4-g0", "int4-g128-foo"):
        with pytest.raises(ConfigError, match="unknown format"):
            parse_format(bad, "pipeline[0].candidates[1]")


def test_onnx_bytes_by_hand():
    # 256 x 300: 3 blocks of 128 per row (the last padded); 4-bit codes 64 B/block, fp16 scales, 4-bit zero points
    f = parse_format("int4-g128")
    assert f.nbytes((256, 300)) == 256 * 3 * 64 + 256 * 3 * 2 + 256 * 2
    assert parse_format("int4-g128-sym").nbytes((256, 300)) == 256 * 3 * 64 + 256 * 3 * 2
    assert parse_format("int2-g32-s32").nbytes((8, 64)) == 8 * 2 * 8 + 8 * 2 * 4 + 8 * 1
    assert parse_format("int8-g128").nbytes((4, 256)) == 4 * 256 + 4 * 2 * 2 + 4 * 2
    assert KEEP.nbytes((10, 10)) == 400
    # dense packing: 3 bits really cost 3 bits there
    assert parse_format("int3-g128").nbytes((128, 128), "dense") == 128 * 128 * 3 // 8 + 128 * 2 + 48


@pytest.mark.parametrize("name", ["int2-g32", "int4-g128", "int8-g64", "int4-g32-sym", "int2-g16-s32"])
def test_predicted_bytes_equal_packed_bytes(name):
    f = parse_format(name)
    w = torch.randn(24, 200)
    assert rtn(w, f).nbytes() == f.nbytes((24, 200))


def test_targets_accept():
    assert parse_format("int4-g128").accepted_by("onnx")
    assert not parse_format("int3-g128").accepted_by("onnx")
    assert not parse_format("int4-g100").accepted_by("onnx")
    assert not parse_format("int4-g128").accepted_by("tensorrt")  # affine
    assert parse_format("int4-g128-sym").accepted_by("tensorrt")
    with pytest.raises(UnsupportedError, match=r"'model.layers.0.mlp.up_proj.weight'.*'int3-g128'.*bits \[2, 4, 8\]"):
        check_target(parse_format("int3-g128"), "onnx", "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(UnsupportedError):
        parse_format("int3-g128").nbytes((128, 128), "onnx")
