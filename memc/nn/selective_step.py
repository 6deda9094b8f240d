"""Recurrent (decode) form of SelectiveMemoryAttention: one token in, the fixed-layout state updated.

Order per token t: the token p = t - window leaves the window; if p starts a new segment (p % segment == 0, p > 0)
the open segment closes first: its ``keep`` best tokens join the pool, which keeps its ``max_tokens`` best (a
rank count and a one-hot scatter, no data-dependent control flow, so it exports with the state as tensors); p
then takes its open-segment slot, token t enters the ring buffer, and the read is one softmax over
[window ++ open segment ++ pool].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from memc.nn.mc_parallel import expand_kv, floor_div
from memc.nn.selective_state import SelectiveState

if TYPE_CHECKING:
    from memc.nn.selective import SelectiveMemoryAttention


def _rank(score: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, H, E] rank of each entry among the valid ones (0 = best)."""
    from memc.nn.selective import outranks

    above = outranks(score.unsqueeze(-1), pos.unsqueeze(-1), score.unsqueeze(-2), pos.unsqueeze(-2))  # [a, b]
    return (above & valid.unsqueeze(-1)).sum(-2)


def _close(mod: "SelectiveMemoryAttention", st: SelectiveState, start: torch.Tensor, closes: torch.Tensor,
           ) -> tuple[torch.Tensor, ...]:
    """The pool (k, v, score, pos) after the open segment (positions start .. start + S - 1) closes."""
    cfg = mod.cfg
    s = cfg.segment
    b, h = st.open_score.shape[:2]
    dev = st.open_score.device
    o_pos = (start + 1 + torch.arange(s, device=dev)).expand(b, h, s)  # position + 1, as pool_pos
    o_cand = _rank(st.open_score, o_pos, torch.ones_like(o_pos, dtype=torch.bool)) < cfg.per_segment
    score = torch.cat([st.pool_score, st.open_score], -1)
    pos = torch.cat([st.pool_pos, o_pos], -1)
    valid = torch.cat([st.pool_pos > 0, o_cand], -1)
    rank = _rank(score, pos, valid)
    m = cfg.max_tokens or (st.pool_pos.shape[-1] + cfg.per_segment)  # unbounded: every candidate, appended
    hot = ((rank.unsqueeze(-1) == torch.arange(m, device=dev)) & valid.unsqueeze(-1))  # [B, H, E, M]
    # slot m takes the one entry ranked m (a gather: a one-hot product over all entries was half of a decode
    # step's time in onnxruntime's Einsum); a slot no entry reaches is empty (zeros, pos 0)
    filled = hot.any(-2)  # [B, H, M]
    src = hot.to(torch.int32).argmax(-2)  # [B, H, M]
    d = st.pool_k.shape[-1]

    def take(values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 4:
            got = torch.gather(values, 2, src.unsqueeze(-1).expand(-1, -1, -1, d))
            return torch.where(filled.unsqueeze(-1), got, torch.zeros((), dtype=got.dtype, device=dev))
        return torch.where(filled, torch.gather(values, 2, src), torch.zeros((), dtype=values.dtype, device=dev))

    new_k = take(torch.cat([st.pool_k, st.open_k], 2))
    new_v = take(torch.cat([st.pool_v, st.open_v], 2))
    new_score = take(score)
    new_pos = take(pos)  # 0 where no entry landed: an empty slot
    if not cfg.max_tokens:
        return new_k, new_v, new_score, new_pos
    return tuple(torch.where(closes, new, old) for new, old in (
        (new_k, st.pool_k), (new_v, st.pool_v), (new_score, st.pool_score), (new_pos, st.pool_pos)))


def selective_step(mod: "SelectiveMemoryAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   x: torch.Tensor, state: SelectiveState) -> tuple[torch.Tensor, SelectiveState]:
    cfg = mod.cfg
    w, c = cfg.window, cfg.segment
    dt = state.win_k.dtype
    dev = q.device
    t = state.t
    score = mod.salience(x).to(dt)  # [B, H, 1]
    ring = torch.arange(w, device=dev)
    hot = ring == torch.remainder(t, w)  # the ring slot token t overwrites, holding token t - window
    old_k = (state.win_k * hot[:, None].to(dt)).sum(2, keepdim=True)
    old_v = (state.win_v * hot[:, None].to(dt)).sum(2, keepdim=True)
    old_score = (state.win_score * hot.to(dt)).sum(2, keepdim=True)
    p = t - w
    enters = p >= 0
    closes = enters & (torch.remainder(p, c) == 0) & (p > 0)

    pool = (state.pool_k, state.pool_v, state.pool_score, state.pool_pos)
    if cfg.max_tokens:
        pool = _close(mod, state, p - c, closes)
    elif bool(closes):  # unbounded pool: grows by `keep` slots (eager decode only)
        pool = _close(mod, state, p - c, closes)
        pool = tuple(a[:, :, : state.pool_pos.shape[-1] + cfg.per_segment] for a in pool)

    slot = (torch.arange(c, device=dev) == torch.remainder(p, c)) & enters  # open-segment slot of token p
    new = SelectiveState(
        t + 1,
        torch.where(hot[:, None], k.to(dt), state.win_k),
        torch.where(hot[:, None], v.to(dt), state.win_v),
        torch.where(hot, score, state.win_score),
        torch.where(slot[:, None], old_k, state.open_k),
        torch.where(slot[:, None], old_v, state.open_v),
        torch.where(slot, old_score, state.open_score),
        *pool,
    )
    return _read(mod, q, new), new


def _read(mod: "SelectiveMemoryAttention", q: torch.Tensor, st: SelectiveState) -> torch.Tensor:
    """The output of the token just written (position st.t - 1): one softmax over window, open segment, pool."""
    cfg = mod.cfg
    w, c, g = cfg.window, cfg.segment, mod.groups
    b = q.shape[0]
    h = st.win_k.shape[1]
    dt = q.dtype
    cur = st.t - 1
    ring = torch.arange(w, device=q.device)
    ok = [(cur - torch.remainder(cur - ring, w)) >= 0]
    keys, values = [st.win_k], [st.win_v]
    if mod.memory_enabled:
        last = cur - w  # the newest memory token
        ok.append((torch.arange(c, device=q.device) <= torch.remainder(last, c)) & (last >= 0))
        keys += [st.open_k, st.pool_k]
        values += [st.open_v, st.pool_v]
    ok = torch.cat([a.expand(b, h, -1) for a in ok] + ([st.pool_pos > 0] if mod.memory_enabled else []), -1)
    kk = expand_kv(torch.cat(keys, 2).to(dt), g)
    vv = expand_kv(torch.cat(values, 2).to(dt), g)
    s = torch.matmul(q, kk.transpose(-1, -2)) * mod.scale  # [B, Hq, 1, L]
    s = s.masked_fill(~expand_kv(ok, g).unsqueeze(2), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vv)
