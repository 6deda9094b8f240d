"""Chunked-parallel form of MemoryCachingAttention (prefill, training, ONNX export): no loop over tokens or segments.

Every segment read is linear in the token terms, so the whole output is one T x T weight matrix times V:
``y_t = sum_j (E_tj + a_{t, slot(t, j)} P_tj) v_j / (sum_j E_tj + mass_t)`` with ``E`` the window softmax terms,
``P_tj = phi_q(q_t) . phi_k(k_j)`` on memory tokens and ``a`` the per-slot read weights. Per-slot sums (counts,
``phi_q^T z``, ``u . keysum``) are masked T x T matrices reduced by a token -> segment one-hot; the merge cap's
slot 0 is a cumulative sum over segments, picked by index arithmetic, so the same graph serves every length.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from memc.nn.mc_state import MemoryCachingState

if TYPE_CHECKING:
    from memc.nn.memory_caching import MemoryCachingAttention


def expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, Hkv * groups, ...]: query head h reads KV head h // groups (GQA)."""
    if groups == 1:
        return t
    b, h = t.shape[0], t.shape[1]
    rest = t.shape[2:]
    return t.unsqueeze(2).expand(b, h, groups, *rest).reshape(b, h * groups, *rest)


def floor_div(a: torch.Tensor, c: int) -> torch.Tensor:
    return torch.div(a, c, rounding_mode="floor")


def parallel_forward(
    mod: "MemoryCachingAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
    dropout: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output [B, Hq, T, D] for positions 0..T-1; ``dropout`` is a [B, Hq, T, T] keep mask for window keys."""
    cfg = mod.cfg
    w, c = cfg.window, cfg.segment
    b, hq, t, _ = q.shape
    dt = q.dtype
    pos = torch.arange(t, device=q.device)
    tq, tk = pos[:, None], pos[None, :]
    k_e, v_e = expand_kv(k, mod.groups), expand_kv(v, mod.groups)

    window = (tk <= tq) & (tk > tq - w)
    if dropout is not None:
        window = window & (dropout | (tk == tq))
    s = torch.matmul(q, k_e.transpose(-1, -2)) * mod.scale
    s = s.masked_fill(~window, float("-inf"))
    if not mod.memory_enabled:
        return torch.matmul(torch.softmax(s, dim=-1), v_e)

    # memory tokens j <= t - window, segment i = j // segment; slot quantities on a [T, N] (query, segment) grid
    n_seg = t // c + 2  # >= every segment index, and never 1 (a size-1 axis would specialise the export)
    seg = torch.arange(n_seg, device=q.device)
    seg_of = floor_div(pos, c)
    onehot = (seg_of[:, None] == seg[None, :]).to(dt)
    memf = (tk <= tq - w).to(dt)
    open_q = floor_div(pos - w, c)  # the open segment of query t (negative: no memory yet)
    closed = seg[None, :] < open_q[:, None]
    is_open = seg[None, :] == open_q[:, None]
    count = torch.matmul(memf, onehot)

    pm = torch.matmul(mod.phi_q(q), expand_kv(mod.phi_k(k), mod.groups).transpose(-1, -2)) * memf
    den = torch.matmul(pm, onehot)
    keydot = None
    if cfg.query_router:
        u = mod.router_query(q, x)
        keydot = torch.matmul(torch.matmul(u, k_e.transpose(-1, -2)) * memf, onehot)

    rep = None
    if cfg.max_segments:
        shift = (open_q - cfg.max_segments).clamp(min=0)  # open_q = number of closed segments
        closed = closed & (seg[None, :] >= shift[:, None])
        if cfg.cap_policy == "merge":  # slot 0 (at index `shift`) = the sum of segments 0..shift
            at = seg[None, :] == shift[:, None]
            count = torch.where(at, count.cumsum(-1), count)
            den = torch.where(at, den.cumsum(-1), den)
            if keydot is not None:
                keydot = torch.where(at, keydot.cumsum(-1), keydot)
            rep = torch.maximum(seg[None, :], shift[:, None])
    valid = closed | is_open
    r = mod.router_logits(count, keydot, valid)
    if cfg.variant == "sparse":
        r = mod.select_sparse(r, closed, is_open)

    m = torch.maximum(s.amax(-1), r.amax(-1)).detach()  # shared running max; the window always holds token t
    e_win = torch.exp(s - m.unsqueeze(-1))
    a, mass = mod.read_weights(r, den.expand(b, hq, t, n_seg), m)
    if rep is not None:
        a = torch.gather(a, -1, rep.expand(b, hq, t, n_seg))
    weights = e_win + a.index_select(-1, seg_of) * pm
    return torch.matmul(weights, v_e) / (e_win.sum(-1) + mass).unsqueeze(-1)


def parallel_state(mod: "MemoryCachingAttention", k: torch.Tensor, v: torch.Tensor) -> MemoryCachingState:
    """The decode state after tokens 0..T-1 (what T calls of ``step`` leave), from segment sums in parallel."""
    cfg = mod.cfg
    w, c, cap = cfg.window, cfg.segment, cfg.max_segments
    b, h, t, d = k.shape
    dt, dev = k.dtype, k.device
    pos = torch.arange(t, device=dev)
    last = pos[-1]

    ring = torch.arange(w, device=dev)
    ring_pos = last - torch.remainder(last - ring, w)  # newest position held by each ring slot
    ok = (ring_pos >= 0)[:, None]
    idx = ring_pos.clamp(min=0)
    win_k = torch.where(ok, k.index_select(2, idx), torch.zeros((), dtype=dt, device=dev))
    win_v = torch.where(ok, v.index_select(2, idx), torch.zeros((), dtype=dt, device=dev))

    n_seg = t // c + 1
    pad = n_seg * c - t
    memtok = (pos <= last - w).to(dt)
    phk = mod.phi_k(k) * memtok[:, None]
    km = k * memtok[:, None]

    def segments(a: torch.Tensor) -> torch.Tensor:  # [B, H, T, X] -> [B, H, N, C, X]
        return F.pad(a, (0, 0, 0, pad)).reshape(b, h, n_seg, c, a.shape[-1])

    phk_s, v_s = segments(phk), segments(v)
    seg_s = torch.einsum("bhncf,bhncd->bhnfd", phk_s, v_s)
    seg_z = phk_s.sum(3)
    seg_ks = segments(km).sum(3)
    seg_n = F.pad(memtok, (0, pad)).reshape(n_seg, c).sum(1)

    seg = torch.arange(n_seg, device=dev)
    open_i = floor_div(last - w, c)
    open_hot = (seg == open_i).to(dt)
    closed = seg < open_i
    if cap:
        shift = (open_i.clamp(min=0) - cap).clamp(min=0)
        slot_of = (seg - shift).clamp(min=0) if cfg.cap_policy == "merge" else seg - shift
        assign = ((slot_of[None, :] == torch.arange(cap, device=dev)[:, None]) & closed[None, :]).to(dt)
    else:  # unbounded: one slot per closed segment (the shape grows with T; eager only)
        n_closed = max((t - 1 - w) // c, 0)
        assign = torch.eye(n_seg, dtype=dt, device=dev)[:n_closed]
    return MemoryCachingState(
        t=(last + 1).to(torch.int64),
        win_k=win_k, win_v=win_v,
        open_s=torch.einsum("n,bhnfd->bhfd", open_hot, seg_s),
        open_z=torch.einsum("n,bhnf->bhf", open_hot, seg_z),
        open_ksum=torch.einsum("n,bhnd->bhd", open_hot, seg_ks),
        open_n=(open_hot * seg_n).sum().expand(b, h).clone(),
        slot_s=torch.einsum("mn,bhnfd->bhmfd", assign, seg_s),
        slot_z=torch.einsum("mn,bhnf->bhmf", assign, seg_z),
        slot_ksum=torch.einsum("mn,bhnd->bhmd", assign, seg_ks),
        slot_n=torch.matmul(assign, seg_n).expand(b, h, -1).clone(),
    )
