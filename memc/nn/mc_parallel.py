"""Chunked-parallel form of MemoryCachingAttention (prefill, training, ONNX export): no loop over tokens or segments.

Every segment read is linear in the token terms, so the whole output is one T x T weight matrix times V:
``y_t = sum_j (E_tj + a_{t, slot(t, j)} P_tj) v_j / (sum_j E_tj + mass_t)`` with ``E`` the window softmax terms,
``P_tj = phi_q(q_t) . phi_k(k_j)`` on memory tokens and ``a`` the per-slot read weights. The per-slot router
inputs (``phi_q^T z_i``, ``u . keysum_i``) are dots with per-segment sums ([T, N], no T x T), the open segment's
from within-segment prefix sums; the merge cap's slot 0 is a cumulative sum over segments, picked by index
arithmetic, so one graph serves every length. Three T x T x D matmuls per layer: q k^T, phi_q phi_k^T, weights v.
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


def segments(a: torch.Tensor, c: int, n_seg: int) -> torch.Tensor:
    """[B, H, T, X] -> [B, H, n_seg, c, X]: tokens grouped by segment j // c, zero-padded to n_seg * c."""
    b, h, t, x = a.shape
    return F.pad(a, (0, 0, 0, n_seg * c - t)).reshape(b, h, n_seg, c, x)


def parallel_forward(
    mod: "MemoryCachingAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
    window_dropout: float = 0.0,
) -> torch.Tensor:
    """Output [B, Hq, T, D] for positions 0..T-1. ``window_dropout`` > 0 drops each window key but the token itself
    with that probability (one ``torch.rand`` draw, so it follows the torch seed)."""
    cfg = mod.cfg
    w, c, g = cfg.window, cfg.segment, mod.groups
    b, hq, t, _ = q.shape
    dt = q.dtype
    # keys live on a grid of n_seg whole segments (zero-padded past T), so that per-segment weights are a reshape
    n_seg = t // c + 2  # >= every segment index, and never 1 (a size-1 axis would specialise the export)
    tp = n_seg * c
    pos = torch.arange(t, device=q.device)
    tq, tk = pos[:, None], torch.arange(tp, device=q.device)[None, :]
    k_p = F.pad(k, (0, 0, 0, tp - t))
    v_p = expand_kv(F.pad(v, (0, 0, 0, tp - t)), g)

    window = (tk <= tq) & (tk > tq - w)
    if window_dropout > 0:
        keep = torch.rand(b, hq, t, tp, device=q.device) >= window_dropout
        window = window & (keep | (tk == tq))
    s = torch.matmul(q, expand_kv(k_p, g).transpose(-1, -2)) * mod.scale
    s = s.masked_fill(~window, float("-inf"))
    if not mod.memory_enabled:
        return torch.matmul(torch.softmax(s, dim=-1), v_p)

    # memory tokens j <= t - window, segment i = j // segment; slot quantities on a [T, N] (query, segment) grid
    seg = torch.arange(n_seg, device=q.device)
    last_mem = pos - w  # the newest memory token of query t (negative: no memory yet)
    open_q = floor_div(last_mem, c)  # its open segment; the segments before it are closed (complete)
    closed = seg[None, :] < open_q[:, None]
    is_open = seg[None, :] == open_q[:, None]
    open_count = (last_mem - open_q * c + 1)[:, None]
    count = torch.where(closed, c, torch.where(is_open, open_count, 0)).to(dt)
    newest = last_mem.clamp(min=0)

    def per_slot(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query_t . (sum of keys_j over slot i's memory tokens): [B, Hq, T, X] x [B, Hkv, TP, X] -> [B, Hq, T, N];
        closed segments use their full sums, the open one its within-segment prefix sum at t - window."""
        parts = keys.reshape(keys.shape[0], keys.shape[1], n_seg, c, keys.shape[-1])
        full = expand_kv(parts.sum(3), g)
        prefix = expand_kv(parts.cumsum(3).reshape(keys.shape).index_select(2, newest), g)
        opened = (query * prefix).sum(-1, keepdim=True)
        return torch.where(is_open, opened, torch.matmul(query, full.transpose(-1, -2)))

    phq = mod.phi_q(q)
    phk_p = F.pad(mod.phi_k(k), (0, 0, 0, tp - t))
    pm = torch.matmul(phq, expand_kv(phk_p, g).transpose(-1, -2)) * (tk <= tq - w).to(dt)
    den = per_slot(phq, phk_p)
    keydot = per_slot(mod.router_query(q, x), k_p) if cfg.query_router else None

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
    a, mass = mod.read_weights(r, den, m)
    if rep is not None:
        a = torch.gather(a, -1, rep.expand(b, hq, t, n_seg))
    mem = (pm.reshape(b, hq, t, n_seg, c) * a.unsqueeze(-1)).reshape(b, hq, t, tp)
    return torch.matmul(e_win + mem, v_p) / (e_win.sum(-1) + mass).unsqueeze(-1)


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

    n_seg = t // c + 2  # as in parallel_forward
    memtok = (pos <= last - w).to(dt)
    phk = mod.phi_k(k) * memtok[:, None]
    km = k * memtok[:, None]

    phk_s = segments(phk, c, n_seg)
    seg_s = torch.einsum("bhncf,bhncd->bhnfd", phk_s, segments(v, c, n_seg))
    seg_z = phk_s.sum(3)
    seg_ks = segments(km, c, n_seg).sum(3)
    seg_n = F.pad(memtok, (0, n_seg * c - t)).reshape(n_seg, c).sum(1)

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
