"""Router loss of distill-attention: teach a memory-caching layer's router where the original attention looks.

The output MSE reaches the router only through a few selected reads, so on a recall model the sparse router keeps
the segment holding the copied token in its top-k about a third of the time. This loss supervises it directly:
the target is the ORIGINAL (teacher) attention's probability mass on the memory tokens (``j <= t - window``)
summed per slot the layer reads (closed segments, merged slot, open segment) and renormalised over them; the
prediction is ``softmax_i(r_ti)`` over the same slots, before sparse selection. The loss is
``KL(target || router)`` averaged over query positions weighted by the teacher's memory mass there, so positions
whose teacher attention stays in the window barely count.
"""
from __future__ import annotations

import torch

from memc.nn.mc_parallel import grouped_matmul, slots
from memc.nn.memory_caching import MemoryCachingAttention


def _kl_rows(target: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(target || q) per row over the last dim, with 0 log 0 = 0."""
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logq), torch.zeros_like(logq))
    return terms.sum(-1)


def _memory_token_weights(layer: MemoryCachingAttention, sl, m: torch.Tensor) -> torch.Tensor:
    """The layer's weight on each memory token before sparse selection, scaled by ``e^-m``:
    ``e^{r_t,slot(j) - m} / (phi_q . z_slot) * phi_q . phi_k_j`` as [B, Hq, T, T], zero off memory."""
    r = sl.r.float()
    live = torch.isfinite(r)
    a = torch.where(live, torch.exp(r - m) / torch.where(live, sl.den.float() + layer.cfg.eps, 1.0), 0.0)
    if sl.rep is not None:
        a = torch.gather(a, -1, sl.rep.expand_as(a))
    return torch.matmul(a, sl.onehot.float().transpose(0, 1)) * sl.pm.float()


def teacher_slot_mass(layer: MemoryCachingAttention, q: torch.Tensor, k: torch.Tensor, sl) -> torch.Tensor:
    """The exact causal softmax's probability on memory tokens, summed per slot the layer reads: [B, Hq, T, N]."""
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    tq, tk = pos[:, None], pos[None, :]
    s = (grouped_matmul(q, k.transpose(-1, -2)) * layer.scale).masked_fill(tk > tq, float("-inf"))
    p = torch.softmax(s.float(), dim=-1) * (tk <= tq - layer.cfg.window)
    mass = torch.matmul(p, sl.onehot.float())
    if sl.merged is not None:
        mass = torch.where(sl.merged, mass.cumsum(-1), mass)
    return mass.masked_fill(~(sl.closed | sl.is_open), 0.0)


def router_kl(layer: MemoryCachingAttention, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mass-weighted mean over query positions of KL(teacher slot mass || softmax of the router logits)."""
    sl = slots(layer, q, k, x)
    with torch.no_grad():
        mass = teacher_slot_mass(layer, q, k, sl)
        total = mass.sum(-1)
        target = mass / total.clamp_min(1e-30).unsqueeze(-1)
    live = total > 0  # query positions with memory and teacher mass on it
    r = torch.where(live.unsqueeze(-1), sl.r.float(), torch.zeros_like(sl.r, dtype=torch.float32))
    logp = torch.log_softmax(r, dim=-1)
    kl = _kl_rows(target, logp)
    return (kl * total).sum() / total.sum().clamp_min(1e-30)


def memory_kl(layer: MemoryCachingAttention, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mass-weighted mean over query positions of KL(teacher || layer) between distributions over single memory
    tokens: the teacher's exact softmax restricted to ``j <= t - window`` and renormalised, against the layer's
    weight on each memory token before sparse selection, ``e^{r_t,slot(j)} / (phi_q . z_slot) * phi_q . phi_k_j``.

    Unlike ``router_kl`` it reaches the router and the feature maps together, token by token: a router that sees
    only segments cannot make its per-segment fit look good while the read inside the segment misses the token.
    """
    sl = slots(layer, q, k, x)
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    tq, tk = pos[:, None], pos[None, :]
    mem = tk <= tq - layer.cfg.window
    with torch.no_grad():
        s = (grouped_matmul(q, k.transpose(-1, -2)) * layer.scale).masked_fill(tk > tq, float("-inf"))
        p = torch.softmax(s.float(), dim=-1) * mem
        total = p.sum(-1)
        target = p / total.clamp_min(1e-30).unsqueeze(-1)
    top = sl.r.float().amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = _memory_token_weights(layer, sl, top)
    logq = torch.log(w.clamp_min(1e-30)) - torch.log(w.sum(-1, keepdim=True).clamp_min(1e-30))
    kl = _kl_rows(target, logq)
    return (kl * total).sum() / total.sum().clamp_min(1e-30)


def attention_kl(layer: MemoryCachingAttention, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over query positions with memory (t >= window) of KL(teacher || layer) between distributions over
    every causal token: the exact softmax against the layer's weights before sparse selection (window softmax
    terms and ``e^{r_t,slot(j)} / (phi_q . z_slot) * phi_q . phi_k_j`` on memory tokens). Unlike ``memory_kl`` it
    also fits how much weight the memory gets against the window (the router bias)."""
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    tq, tk = pos[:, None], pos[None, :]
    window = (tk <= tq) & (tk > tq - layer.cfg.window)
    s_all = grouped_matmul(q, k.transpose(-1, -2)).float() * layer.scale
    with torch.no_grad():
        target = torch.softmax(s_all.masked_fill(tk > tq, float("-inf")), dim=-1)
    s = s_all.masked_fill(~window, float("-inf"))
    sl = slots(layer, q, k, x, s.to(q.dtype))
    m = torch.maximum(s.amax(-1), sl.r.float().amax(-1)).detach().unsqueeze(-1)
    w = torch.exp(s - m) + _memory_token_weights(layer, sl, m)
    logq = torch.log(w.clamp_min(1e-30)) - torch.log(w.sum(-1, keepdim=True))
    kl = _kl_rows(target, logq)[..., layer.cfg.window:]
    return kl.mean() if kl.numel() else kl.sum()
