"""RTN and GPTQ: packed codes round-trip to the fake-quant weights; GPTQ's layer error <= RTN's."""
import pytest
import torch

from memc.quant.formats import parse_format
from memc.quant.gptq import Hessian, gptq
from memc.quant.packing import pack_codes, unpack_codes
from memc.quant.rtn import dequantize, rtn


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 37), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, -(-37 * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


def test_pack_is_lsb_first():
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]


@pytest.mark.parametrize("name", ["int2-g32", "int3-g64", "int4-g128", "int4-g16-sym", "int8-g64", "int8-g32-s32"])
def test_rtn_packed_round_trip_and_error(name):
    torch.manual_seed(0)
    fmt = parse_format(name)
    w = torch.randn(16, 200)
    q = rtn(w, fmt)
    p = q.packed()
    rows, blocks = q.scales.shape
    codes = unpack_codes(p["codes"].view(rows, -1), fmt.container_bits, blocks * fmt.group)
    zeros = unpack_codes(p["zeros"], fmt.container_bits, blocks) if "zeros" in p else torch.full_like(q.zeros, 1 << (fmt.container_bits - 1))
    assert torch.equal(dequantize(codes, p["scales"], zeros, fmt.group, 200), q.dequantize())
    assert int(q.codes.max()) <= fmt.qmax
    # half a step at most inside the group's chosen range; outside it (the range search may clip outliers) the
    # value's distance to the range's end more
    step = q.scales.float().repeat_interleave(fmt.group, 1)[:, :200]
    zero = q.zeros.float().repeat_interleave(fmt.group, 1)[:, :200]
    lo, hi = -zero * step, (fmt.qmax - zero) * step
    outside = (lo - w).clamp(min=0) + (w - hi).clamp(min=0)
    assert float((((w - q.dequantize()).abs() - outside) / step).max()) <= 0.5 + 1e-3


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errs = [float((rtn(w, parse_format(f"int{b}-g64")).dequantize() - w).pow(2).sum()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["int2-g32", "int4-g64", "int3-g128-sym"])
def test_gptq_layer_error_not_above_rtn(name, act_order):
    torch.manual_seed(1)
    fmt = parse_format(name)
    rows, cols = 32, 192
    mix = torch.randn(cols, cols) / cols**0.5
    x = torch.randn(512, cols) @ mix + 0.3 * torch.randn(512, cols)  # correlated inputs: where GPTQ helps
    w = torch.randn(rows, cols)
    h = Hessian(cols)
    for chunk in x.split(100):
        h.add(chunk)
    assert torch.allclose(h.h, 2 * x.double().T @ x.double() / 512)
    q = gptq(w, h.h, fmt, block=64, act_order=act_order)
    out_err = lambda wq: float((x @ (wq - w).T).pow(2).sum())
    e_gptq, e_rtn = out_err(q.dequantize()), out_err(rtn(w, fmt).dequantize())
    assert e_gptq <= e_rtn
    # the packed form still holds exactly the fake-quant weight
    p = q.packed()
    blocks = q.scales.shape[1]
    codes = unpack_codes(p["codes"].view(rows, -1), fmt.container_bits, blocks * fmt.group)
    zeros = unpack_codes(p["zeros"], fmt.container_bits, blocks) if "zeros" in p else torch.full_like(q.zeros, 1 << (fmt.container_bits - 1))
    assert torch.equal(dequantize(codes, p["scales"], zeros, fmt.group, cols), q.dequantize())


@pytest.mark.parametrize("name", ["int2-g32", "int3-g128", "int4-g32-sym", "int4-g128"])
def test_range_search_never_loses_to_the_full_range_and_clips_outliers(name, monkeypatch):
    """Every group's chosen range has at most the min/max range's squared error (1.0 is a candidate); with one
    outlier per group the search shrinks the range and the total error drops."""
    import memc.quant.rtn as R

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 256, generator=gen)
    w[:, ::32] *= 6.0  # an outlier in every group of 32
    fmt = parse_format(name)
    searched = rtn(w, fmt)
    monkeypatch.setattr(R, "SHRINK", (1.0,))
    full = rtn(w, fmt)
    per_group = lambda q: (q.dequantize() - w).square().view(16, -1, fmt.group).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(full) + 1e-6).all()
    assert per_group(searched).sum() < per_group(full).sum()
    assert (searched.scales.float() <= full.scales.float() + 1e-6).all()
