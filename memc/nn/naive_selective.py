"""Plain-python reference of SelectiveMemoryAttention: for every query it replays the pool as a stream (segment by
segment: take the segment's best ``keep``, insert, evict down to ``max_tokens``) with sorted lists, then one softmax
over the visible keys. The parallel form's closed-form top-M set and the step's scatter are tested against it."""
from __future__ import annotations

import torch

from memc.nn.selective import SelectiveMemoryAttention


def naive_selective(mod: SelectiveMemoryAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
    cfg = mod.cfg
    w, c = cfg.window, cfg.segment
    b, hq, t, _ = q.shape
    score = mod.salience(x)  # [B, Hkv, T]
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kv = h // mod.groups
            sc = score[bi, kv].tolist()
            best = lambda toks: sorted(toks, key=lambda j: (-sc[j], j))  # noqa: E731
            for i in range(t):
                seen = list(range(max(0, i - w + 1), i + 1))
                if mod.memory_enabled and i >= w:
                    last = i - w
                    open_i = last // c
                    seen += list(range(open_i * c, last + 1))
                    pool: list[int] = []
                    for n in range(open_i):
                        pool = best(pool + best(range(n * c, n * c + c))[: cfg.per_segment])
                        if cfg.max_tokens:
                            pool = pool[: cfg.max_tokens]
                    seen += pool
                idx = torch.tensor(sorted(seen))
                logits = (k[bi, kv, idx] @ q[bi, h, i]) * mod.scale
                out[bi, h, i] = torch.softmax(logits, 0) @ v[bi, kv, idx]
    return out
