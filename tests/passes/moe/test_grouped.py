"""The grouped-experts form the re-fit and calibration run: same values and gradients as the exported
gathered-weight bmm, for every MoE family; graphs without one are left alone."""
from __future__ import annotations

import pytest
import torch

from memc.passes.moe.detect import find_moe_sites
from memc.passes.moe.grouped import grouped_form, grouped_matvec
from tests.passes.moe.conftest import MOE_NAMES
from tests.passes.moe.test_prune import _as_float64, _inputs, _out

FUSED = [n for n in MOE_NAMES if n != "handwritten"]


def _layers(program) -> int:
    return len(find_moe_sites(program.module))


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_matvec_equals_gathered_bmm(transposed):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, 3, dtype=torch.float64, generator=gen)
    ids = torch.tensor([4, 0, 4, 2, 2, 2, 0, 4])  # experts 1 and 3 unused
    x = torch.randn(8, 7 if transposed else 3, dtype=torch.float64, generator=gen)
    if transposed:
        ref = torch.bmm(x.unsqueeze(1), w[ids]).squeeze(1)
    else:
        ref = torch.bmm(w[ids], x.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(grouped_matvec(w, ids, x, transposed), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FUSED)
def test_grouped_form_matches_the_exported_experts(captured, name):
    program = captured(name)
    gm = _as_float64(program.module)
    fast, replaced = grouped_form(gm)
    assert replaced >= 2 * _layers(program)  # gate/up and down of every MoE layer
    x = _inputs(program, name)
    torch.testing.assert_close(_out(fast, x), _out(gm, x), rtol=0, atol=1e-10)
    grads = []
    for module in (gm, fast):
        module.zero_grad()
        for p in gm.parameters():
            p.requires_grad_(True)
        y = module(x)
        (y[0] if isinstance(y, (tuple, list)) else y).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("experts" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-10)


def test_graphs_without_gathered_experts_are_unchanged(captured):
    program = captured("handwritten")
    fast, replaced = grouped_form(program.module)
    assert replaced == 0
    x = _inputs(program, "handwritten")
    torch.testing.assert_close(_out(fast, x), _out(program.module, x), rtol=0, atol=0)
