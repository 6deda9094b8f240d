"""The router loss's target is the teacher's attention mass per memory slot, and the KL is zero when the router
matches it."""
from __future__ import annotations

import torch

from memc.nn.mc_parallel import slots
from memc.nn.memory_caching import MemoryCachingAttention, MemoryCachingConfig
from memc.passes.attention.router_loss import router_kl, teacher_slot_mass


def _layer(**cfg) -> tuple[MemoryCachingAttention, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    layer = MemoryCachingAttention(MemoryCachingConfig(window=3, segment=2, feature_dim=4, **cfg), num_heads=2,
                                   num_kv_heads=1, head_dim=4, hidden_size=8)
    q, k = torch.randn(1, 2, 11, 4), torch.randn(1, 1, 11, 4)
    return layer, (q, k, torch.randn(1, 11, 8))


def test_teacher_mass_is_the_softmax_on_memory_tokens_per_segment():
    layer, (q, k, x) = _layer(variant="sparse", top_k=1)
    mass = teacher_slot_mass(layer, q, k, slots(layer, q, k, x))
    s = (q @ k.transpose(-1, -2)) * layer.scale  # GQA: both query heads read KV head 0
    p = torch.softmax(s.masked_fill(torch.ones(11, 11).triu(1).bool(), float("-inf")), -1)
    t = 9  # memory tokens 0..6: closed segments 0, 1, 2 and the open segment 3 holding token 6
    expected = torch.stack([p[0, :, t, 0:2].sum(-1), p[0, :, t, 2:4].sum(-1), p[0, :, t, 4:6].sum(-1), p[0, :, t, 6]], -1)
    torch.testing.assert_close(mass[0, :, t, :4], expected)
    assert (mass[0, :, t, 4:] == 0).all() and (mass[0, :, :3] == 0).all()  # no memory before position window


def test_kl_is_positive_and_has_router_gradients():
    layer, (q, k, x) = _layer(variant="gated")
    nn_init = torch.nn.init
    nn_init.normal_(layer.router_b.weight, std=0.5)
    kl = router_kl(layer, q, k, x)
    kl.backward()
    assert kl > 0 and layer.router_b.weight.grad.abs().sum() > 0
    assert layer.phi_q.weight.grad is None  # the router loss trains only the router
