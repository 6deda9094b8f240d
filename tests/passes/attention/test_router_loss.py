"""The router loss's target is the teacher's attention mass per memory slot, and the KL is zero when the router
matches it."""
from __future__ import annotations

import torch

from memc.nn.mc_parallel import slots
from memc.nn.memory_caching import MemoryCachingAttention, MemoryCachingConfig
from memc.passes.attention.router_loss import attention_kl, memory_kl, router_kl, teacher_slot_mass


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


def _memory_kl_by_loops(layer: MemoryCachingAttention, q, k, x) -> torch.Tensor:
    """memory_kl in plain torch, one query at a time, for the gated, uncapped layer of _layer (GQA 2:1)."""
    w, c = layer.cfg.window, layer.cfg.segment
    sl = slots(layer, q, k, x)
    phq, phk = layer.phi_q(q), layer.phi_k(k)
    num, den = torch.zeros(()), torch.zeros(())
    for h in range(2):
        for t in range(q.shape[2]):
            mem = list(range(t - w + 1))
            if not mem:
                continue
            s = torch.stack([q[0, h, t] @ k[0, 0, j] for j in range(t + 1)]) * layer.scale
            p = torch.softmax(s, 0)[: len(mem)]
            total = p.sum()
            target = p / total
            wt = torch.stack([torch.exp(sl.r[0, h, t, j // c])
                              / (phq[0, h, t] @ phk[0, 0, (j // c) * c: min((j // c + 1) * c, len(mem))].sum(0))
                              * (phq[0, h, t] @ phk[0, 0, j]) for j in mem])
            kl = (target * (target.log() - (wt / wt.sum()).log())).sum()
            num, den = num + kl * total, den + total
    return num / den


def test_memory_kl_matches_a_plain_reference_and_trains_router_and_feature_maps():
    for router in ("mean_key", "phi_mass", "key_phi", "phi_window"):
        layer, (q, k, x) = _layer(variant="gated", router=router)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn_like(p))
        kl = memory_kl(layer, q, k, x)
        torch.testing.assert_close(kl, _memory_kl_by_loops(layer, q, k, x), rtol=1e-4, atol=1e-6)
        kl.backward()
        assert kl > 0
        for name, p in layer.named_parameters():
            if name == "router_bias":  # a shift of every slot's logit: the distribution over tokens ignores it
                assert p.grad.abs().max() < 1e-5
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, (router, name)


def test_attention_kl_matches_a_plain_reference_and_sets_the_memory_share():
    """KL(exact softmax || the layer's pre-selection weights over window and memory tokens), one query at a time;
    unlike memory_kl it depends on the router bias (the memory's share against the window)."""
    w, c = 3, 2
    for router in ("mean_key", "phi_window"):
        layer, (q, k, x) = _layer(variant="gated", router=router)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn_like(p))
        sl = slots(layer, q, k, x)
        phq, phk = layer.phi_q(q), layer.phi_k(k)
        total, n = torch.zeros(()), 0
        for h in range(2):
            for t in range(w, q.shape[2]):
                s = torch.stack([q[0, h, t] @ k[0, 0, j] for j in range(t + 1)]) * layer.scale
                target = torch.softmax(s, 0)
                mem = t - w + 1
                wt = [torch.exp(sl.r[0, h, t, j // c])
                      / (phq[0, h, t] @ phk[0, 0, (j // c) * c: min((j // c + 1) * c, mem)].sum(0))
                      * (phq[0, h, t] @ phk[0, 0, j]) for j in range(mem)]
                wt = torch.stack(wt + [torch.exp(s[j]) for j in range(mem, t + 1)])
                total, n = total + (target * (target.log() - (wt / wt.sum()).log())).sum(), n + 1
        kl = attention_kl(layer, q, k, x)
        torch.testing.assert_close(kl, total / n, rtol=1e-4, atol=1e-6)
        kl.backward()
        assert layer.router_bias.grad.abs().sum() > 0 and layer.phi_k.weight.grad.abs().sum() > 0
