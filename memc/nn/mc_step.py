"""Recurrent (decode) form of MemoryCachingAttention: one token in, the fixed-layout state updated.

With a cap every decision (does a segment close, is the cache full, which ring slot) is a tensor predicate
applied with ``torch.where``, so the step exports with the state as plain tensors and no data-dependent python
control flow. Order per token t: the token t - window leaves the window (if a segment boundary is crossed the open
segment is first pushed into the cache), joins the open segment, token t enters the ring buffer, then the read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from memc.nn.mc_parallel import expand_kv, floor_div
from memc.nn.mc_state import MemoryCachingState

if TYPE_CHECKING:
    from memc.nn.memory_caching import MemoryCachingAttention


def _push_capped(cur: torch.Tensor, new: torch.Tensor, closes: torch.Tensor, n_closed: torch.Tensor,
                 cap: int, merge: bool) -> torch.Tensor:
    """Cached slots [B, H, M, ...] after the open segment ``new`` [B, H, ...] closes (when ``closes``)."""
    new = new.unsqueeze(2)
    if cap == 1:
        shifted = cur + new if merge else new
    elif merge:  # slot 1 folds into slot 0, the rest move down, the new segment goes last
        shifted = torch.cat([cur[:, :, :1] + cur[:, :, 1:2], cur[:, :, 2:], new], dim=2)
    else:
        shifted = torch.cat([cur[:, :, 1:], new], dim=2)
    hot = (torch.arange(cap, device=cur.device) == n_closed).reshape(1, 1, cap, *([1] * (cur.dim() - 3)))
    filled = torch.where(hot, new, cur)
    return torch.where(closes, torch.where(n_closed >= cap, shifted, filled), cur)


def recurrent_step(
    mod: "MemoryCachingAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
    state: MemoryCachingState,
) -> tuple[torch.Tensor, MemoryCachingState]:
    cfg = mod.cfg
    w, c, cap = cfg.window, cfg.segment, cfg.max_segments
    dt = state.win_k.dtype
    t = state.t
    ring = torch.arange(w, device=q.device)
    hot = ring == torch.remainder(t, w)  # the ring slot token t overwrites, holding token t - window
    old_k = (state.win_k * hot[:, None].to(dt)).sum(2)
    old_v = (state.win_v * hot[:, None].to(dt)).sum(2)
    p = t - w
    enters = p >= 0
    closes = enters & (torch.remainder(p, c) == 0) & (p > 0)

    cached = (state.slot_s, state.slot_z, state.slot_ksum, state.slot_n)
    opened = (state.open_s, state.open_z, state.open_ksum, state.open_n)
    if cap:
        n_closed = floor_div(p - 1, c).clamp(min=0)  # closed segments before this token
        merge = cfg.cap_policy == "merge"
        cached = tuple(_push_capped(a, o, closes, n_closed, cap, merge) for a, o in zip(cached, opened))
    elif bool(closes):  # unbounded cache: grows by one slot (eager decode only)
        cached = tuple(torch.cat([a, o.unsqueeze(2)], dim=2) for a, o in zip(cached, opened))

    phk = mod.phi_k(old_k.unsqueeze(2).to(q.dtype)).squeeze(2).to(dt)
    add = enters.to(dt)
    added = (phk.unsqueeze(-1) * old_v.unsqueeze(-2), phk, old_k, torch.ones_like(state.open_n))
    opened = tuple(torch.where(closes, torch.zeros_like(o), o) + add * a for o, a in zip(opened, added))

    new = MemoryCachingState(
        t + 1,
        torch.where(hot[:, None], k.to(dt), state.win_k),
        torch.where(hot[:, None], v.to(dt), state.win_v),
        *opened, *cached,
    )
    return _read(mod, q, x, new), new


def _read(mod: "MemoryCachingAttention", q: torch.Tensor, x: torch.Tensor, st: MemoryCachingState) -> torch.Tensor:
    """The output of the token just written (position st.t - 1): window softmax + the cached and open reads."""
    cfg = mod.cfg
    w = cfg.window
    b, hq, _, d = q.shape
    h, g = mod.num_kv_heads, mod.groups
    dt = q.dtype
    cur = st.t - 1
    ring = torch.arange(w, device=q.device)
    ring_ok = (cur - torch.remainder(cur - ring, w)) >= 0
    win_k, win_v = expand_kv(st.win_k.to(dt), g), expand_kv(st.win_v.to(dt), g)
    s = torch.matmul(q, win_k.transpose(-1, -2)) * mod.scale  # [B, Hq, 1, W]
    s = s.masked_fill(~ring_ok, float("-inf"))
    if not mod.memory_enabled:
        return torch.matmul(torch.softmax(s, dim=-1), win_v)

    slots_s = torch.cat([st.slot_s, st.open_s.unsqueeze(2)], dim=2).to(dt)  # [B, H, L, F, D], open last
    slots_z = torch.cat([st.slot_z, st.open_z.unsqueeze(2)], dim=2).to(dt)
    slots_n = torch.cat([st.slot_n, st.open_n.unsqueeze(2)], dim=2).to(dt)
    n_slots = slots_s.shape[2]

    def per_query_head(a: torch.Tensor) -> torch.Tensor:  # [B, H, G, L] -> [B, Hq, 1, L]
        return a.reshape(b, hq, 1, n_slots)

    phq = mod.phi_q(q).reshape(b, h, g, -1)
    num = torch.einsum("bhgf,bhlfd->bhgld", phq, slots_s).reshape(b, hq, n_slots, d)
    den = per_query_head(torch.einsum("bhgf,bhlf->bhgl", phq, slots_z))
    keydot = None
    if cfg.query_router:
        u = mod.router_query(q, x).reshape(b, h, g, d)
        slots_ks = torch.cat([st.slot_ksum, st.open_ksum.unsqueeze(2)], dim=2).to(dt)
        keydot = per_query_head(torch.einsum("bhgd,bhld->bhgl", u, slots_ks))
    count = per_query_head(slots_n.unsqueeze(2).expand(b, h, g, n_slots))
    valid = count > 0
    is_open = (torch.arange(n_slots, device=q.device) == n_slots - 1) & valid
    r = mod.router_logits(count, keydot, valid, den, s.amax(-1))
    if cfg.variant == "sparse":
        r = mod.select_sparse(r, valid & ~is_open, is_open)

    m = torch.maximum(s.amax(-1), r.amax(-1)).detach()
    e_win = torch.exp(s - m.unsqueeze(-1))
    a, mass = mod.read_weights(r, den, m)
    out = torch.matmul(e_win, win_v) + torch.matmul(a, num)
    return out / (e_win.sum(-1) + mass).unsqueeze(-1)
