"""Plain-torch, token-by-token reference of MemoryCachingAttention (fla-org ``naive.py`` style).

Slow and obviously correct: for every query position it rebuilds the window, every segment's sums and the capped
slot list from scratch with python loops, then takes one softmax over [window logits ++ memory logits] against
[window values ++ segment reads]. Every fast form (parallel, prefill, step) is tested against it.
"""
from __future__ import annotations

import torch

from memc.nn.memory_caching import MemoryCachingAttention


def _stats(phk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: list[int]) -> dict[str, torch.Tensor]:
    """One segment's S, z, key sum and count over ``tokens``: phk [B, H, T, F], k, v [B, H, T, D]."""
    idx = torch.tensor(tokens, dtype=torch.long)
    return {
        "S": torch.einsum("bhjf,bhjd->bhfd", phk[:, :, idx], v[:, :, idx]),
        "z": phk[:, :, idx].sum(2),
        "ks": k[:, :, idx].sum(2),
        "n": torch.tensor(float(len(tokens)), dtype=k.dtype),
    }


def _add(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: a[key] + b[key] for key in a}


def naive_memory_caching(
    mod: MemoryCachingAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
) -> torch.Tensor:
    """y [B, Hq, T, D] for positions 0..T-1, without window dropout (the module's eval behaviour)."""
    cfg = mod.cfg
    w, c, cap = cfg.window, cfg.segment, cfg.max_segments
    g = mod.groups
    phq = mod.phi_q(q)
    phk = mod.phi_k(k).repeat_interleave(g, dim=1)  # query head h reads KV head h // groups
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    u = mod.router_query(q, x)
    tau = torch.exp(mod.log_tau).to(q.dtype)[None, :]
    bias = mod.router_bias.to(q.dtype)[None, :]
    out = []
    for t in range(q.shape[2]):
        lo = max(0, t - w + 1)
        logits = [torch.einsum("bhd,bhjd->bhj", q[:, :, t], k[:, :, lo:t + 1]) * mod.scale]
        values = [v[:, :, lo:t + 1]]
        if mod.memory_enabled and t >= w:
            last = t - w  # newest memory token
            open_i = last // c
            closed = [_stats(phk, k, v, list(range(i * c, i * c + c))) for i in range(open_i)]
            if cap and len(closed) > cap:
                if cfg.cap_policy == "merge":
                    merged = closed[0]
                    for seg in closed[1:len(closed) - cap + 1]:
                        merged = _add(merged, seg)
                    closed = [merged] + closed[len(closed) - cap + 1:]
                else:
                    closed = closed[-cap:]
            slots = closed + [_stats(phk, k, v, list(range(open_i * c, last + 1)))]
            r = []
            reads = []
            for sl in slots:
                num = torch.einsum("bhf,bhfd->bhd", phq[:, :, t], sl["S"])
                den = torch.einsum("bhf,bhf->bh", phq[:, :, t], sl["z"]) + cfg.eps
                reads.append(num / den[..., None])
                if cfg.router in ("phi_mass", "phi_window"):
                    wmax = logits[0].amax(-1) if cfg.router == "phi_window" else 0.0
                    r.append(torch.log(den) / tau + bias + wmax)
                    continue
                base = torch.log(den) if cfg.router == "key_phi" else torch.log(sl["n"])
                logit = (base + bias).expand(q.shape[0], -1)
                if cfg.query_router:
                    kbar = sl["ks"] / sl["n"]
                    logit = logit + torch.einsum("bhd,bhd->bh", u[:, :, t], kbar) * mod.scale / tau
                r.append(logit)
            r = torch.stack(r, dim=-1)  # [B, H, L]
            if cfg.variant == "sparse" and len(closed) > cfg.top_k:
                order = torch.argsort(-r[..., :-1], dim=-1, stable=True)  # ties: the older slot first
                drop = torch.ones_like(r, dtype=torch.bool)
                drop.scatter_(-1, order[..., :cfg.top_k], False)
                drop[..., -1] = False
                r = r.masked_fill(drop, float("-inf"))
            if cfg.variant == "soup":
                wts = torch.softmax(r, dim=-1)
                s_bar = sum(wts[..., i, None, None] * sl["S"] for i, sl in enumerate(slots))
                z_bar = sum(wts[..., i, None] * sl["z"] for i, sl in enumerate(slots))
                num = torch.einsum("bhf,bhfd->bhd", phq[:, :, t], s_bar)
                den = torch.einsum("bhf,bhf->bh", phq[:, :, t], z_bar) + cfg.eps
                logits.append(torch.logsumexp(r, dim=-1, keepdim=True))
                values.append((num / den[..., None]).unsqueeze(2))
            else:
                logits.append(r)
                values.append(torch.stack(reads, dim=2))
        p = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
        out.append(torch.einsum("bhj,bhjd->bhd", p, torch.cat(values, dim=2)))
    return torch.stack(out, dim=2)
