"""Chunked-parallel form of MemoryCachingAttention (prefill, training, ONNX export): no loop over tokens or segments.

Every segment read is linear in the token terms, so the whole output is one T x T weight matrix times V:
``y_t = sum_j (E_tj + a_{t, slot(t, j)} P_tj) v_j / (sum_j E_tj + mass_t)`` with ``E`` the window softmax terms,
``P_tj = phi_q(q_t) . phi_k(k_j)`` on memory tokens and ``a`` the per-slot read weights. Tokens map to segments
through a [T, N] one-hot (no padding: padded lengths defeat torch.export's symbolic shapes), so per-slot sums are
small matmuls; the merge cap's slot 0 is a cumulative sum over segments, picked by index arithmetic, so one graph
serves every length. Three T x T x D matmuls per layer (q k^T, phi_q phi_k^T, weights v) plus T x T x N ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, Hq, T, X] @ [B, Hkv, X, Y] -> [B, Hq, T, Y]: query head h uses KV head h // groups (GQA), by a
    broadcast over the group axis (splitting the head axis keeps the export free of length-dependent guards)."""
    bsz, hq, t, x = a.shape
    hkv = b.shape[1]
    out = torch.matmul(a.reshape(bsz, hkv, hq // hkv, t, x), b.unsqueeze(2))
    return out.reshape(bsz, hq, t, out.shape[-1])


def floor_div(a: torch.Tensor, c: int) -> torch.Tensor:
    return torch.div(a, c, rounding_mode="floor")


def parallel_forward(
    mod: "MemoryCachingAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
    window_dropout: float = 0.0,
) -> torch.Tensor:
    """Output [B, Hq, T, D] for positions 0..T-1. ``window_dropout`` > 0 drops each window key but the token itself
    with that probability (one ``torch.rand`` draw, so it follows the torch seed)."""
    cfg = mod.cfg
    w = cfg.window
    b, hq, t, _ = q.shape
    dt = q.dtype
    pos = torch.arange(t, device=q.device)
    tq, tk = pos[:, None], pos[None, :]

    window = (tk <= tq) & (tk > tq - w)
    if window_dropout > 0:
        keep = torch.rand(b, hq, t, t, device=q.device) >= window_dropout
        window = window & (keep | (tk == tq))
    s = grouped_matmul(q, k.transpose(-1, -2)) * mod.scale
    s = s.masked_fill(~window, float("-inf"))
    if not mod.memory_enabled:
        return grouped_matmul(torch.softmax(s, dim=-1), v)

    sl = slots(mod, q, k, x, s)
    onehot, rep, n_seg = sl.onehot, sl.rep, sl.onehot.shape[1]
    pm, den = sl.pm, sl.den
    r = sl.r
    if cfg.variant == "sparse":
        r = mod.select_sparse(r, sl.closed, sl.is_open)

    m = torch.maximum(s.amax(-1), r.amax(-1)).detach()  # shared running max; the window always holds token t
    e_win = torch.exp(s - m.unsqueeze(-1))
    a, mass = mod.read_weights(r, den, m)
    if rep is not None:
        a = torch.gather(a, -1, rep.expand(b, hq, t, n_seg))
    weights = e_win + torch.matmul(a, onehot.transpose(0, 1)) * pm  # a_{t, segment of j} P_tj
    return grouped_matmul(weights, v) / (e_win.sum(-1) + mass).unsqueeze(-1)


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
    seg = torch.arange(n_seg, device=dev)
    memtok = pos <= last - w
    onehot = ((floor_div(pos, c)[:, None] == seg[None, :]) & memtok[:, None]).to(dt)  # memory token -> segment
    phk = mod.phi_k(k)
    by_seg = phk.unsqueeze(2) * onehot.transpose(0, 1)[:, :, None]  # [B, H, N, T, F]
    seg_s = torch.matmul(by_seg.transpose(-1, -2), v.unsqueeze(2))  # [B, H, N, F, D]
    seg_z = torch.matmul(onehot.transpose(0, 1), phk)
    seg_ks = torch.matmul(onehot.transpose(0, 1), k)
    seg_n = onehot.sum(0)

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


@dataclass
class Slots:
    """The memory slots a query reads, on a [T, N] (query, segment) grid: ``r`` the router logits before sparse
    selection (-inf on invalid slots), ``onehot`` token -> segment [T, N], the ``closed`` / ``is_open`` masks,
    ``merged`` the merge cap's slot-0 position (or None), ``rep`` the slot each segment reads (or None), ``pm`` the
    feature-map products phi_q(q_t) . phi_k(k_j) on memory tokens [B, Hq, T, T] and ``den`` their sums per slot
    phi_q(q_t) . z_i [B, Hq, T, N]."""

    r: torch.Tensor
    onehot: torch.Tensor
    closed: torch.Tensor
    is_open: torch.Tensor
    merged: torch.Tensor | None
    rep: torch.Tensor | None
    pm: torch.Tensor
    den: torch.Tensor


def slots(mod: "MemoryCachingAttention", q: torch.Tensor, k: torch.Tensor, x: torch.Tensor,
          s: torch.Tensor | None = None) -> Slots:
    """Router logits of every query over its cached segments and the open one (shared by the forward pass and the
    distillation's losses); ``s`` the window logits [B, Hq, T, T] (-inf off the window) if the caller has them."""
    cfg = mod.cfg
    w, c, g = cfg.window, cfg.segment, mod.groups
    b, hq, t, _ = q.shape
    dt = q.dtype
    pos = torch.arange(t, device=q.device)
    at = None
    # memory tokens j <= t - window, segment i = j // segment; slot quantities on a [T, N] (query, segment) grid
    n_seg = t // c + 2  # >= every segment index, and never 1 (a size-1 axis would specialise the export)
    seg = torch.arange(n_seg, device=q.device)
    seg_of = floor_div(pos, c)
    onehot = (seg_of[:, None] == seg[None, :]).to(dt)  # [T, N]
    last_mem = pos - w  # the newest memory token of query t (negative: no memory yet)
    open_q = floor_div(last_mem, c)  # its open segment; the segments before it are closed (complete)
    closed = seg[None, :] < open_q[:, None]
    is_open = seg[None, :] == open_q[:, None]
    open_count = (last_mem - open_q * c + 1)[:, None]
    count = torch.where(closed, c, torch.where(is_open, open_count, 0)).to(dt)

    keydot = None
    if cfg.query_router:
        u = mod.router_query(q, x)
        # closed segments: u . (segment key sum); the open one: u . (within-segment prefix sum at t - window),
        # a difference of running sums (router logits tolerate its rounding; the reads above are exact sums)
        seg_ks = torch.matmul(onehot.transpose(0, 1), k)  # [B, Hkv, N, D]
        run = k.cumsum(2)
        start = seg_of * c - 1  # the token before each segment's first
        run_before = torch.where((start >= 0)[:, None], run.index_select(2, start.clamp(min=0)), 0.0)
        newest = last_mem.clamp(min=0)
        prefix = (run - run_before).index_select(2, newest)  # [B, Hkv, T, D]
        opened = (u.reshape(b, k.shape[1], g, t, -1) * prefix.unsqueeze(2)).sum(-1, keepdim=True)
        opened = opened.reshape(b, hq, t, 1)
        keydot = torch.where(is_open, opened, grouped_matmul(u, seg_ks.transpose(-1, -2)))

    rep = None
    if cfg.max_segments:
        shift = (open_q - cfg.max_segments).clamp(min=0)  # open_q = number of closed segments
        closed = closed & (seg[None, :] >= shift[:, None])
        if cfg.cap_policy == "merge":  # slot 0 (at index `shift`) = the sum of segments 0..shift
            at = seg[None, :] == shift[:, None]
            count = torch.where(at, count.cumsum(-1), count)
            if keydot is not None:
                keydot = torch.where(at, keydot.cumsum(-1), keydot)
            rep = torch.maximum(seg[None, :], shift[:, None])
    tq, tk = pos[:, None], pos[None, :]
    pm = grouped_matmul(mod.phi_q(q), mod.phi_k(k).transpose(-1, -2)) * (tk <= tq - w).to(dt)
    den = torch.matmul(pm, onehot)  # phi_q(q_t) . z_i over the memory tokens of segment i
    if at is not None:
        den = torch.where(at, den.cumsum(-1), den)
    wmax = None
    if cfg.router == "phi_window":
        if s is None:
            window = (tk <= tq) & (tk > tq - w)
            s = (grouped_matmul(q, k.transpose(-1, -2)) * mod.scale).masked_fill(~window, float("-inf"))
        wmax = s.amax(-1)
    valid = closed | is_open
    r = mod.router_logits(count, keydot, valid, den, wmax)
    return Slots(r, onehot, closed, is_open, at, rep, pm, den)
