"""The select variant's training signal: regress each token's salience on the teacher's attention log-odds.

The selection is discrete, so the output error gives the scorer no gradient; instead the scorer learns, from the
token's own layer input, what the teacher's future queries will want of it: the largest log-odds
``log(p / (1 - p))`` that any query at least ``window`` tokens later gives it (max over the query heads of its KV
group). Log-odds, not p: on the recall model's copy heads ~12% of code tokens get p > 0.994 from some far query
(induction on repeated code), so p saturates and ties with the planted values (p ~ 1 - 1e-6), while the log-odds
keep the margins (benchmarks/results/memory_caching_select.md).
"""
from __future__ import annotations

import torch

from memc.nn.mc_parallel import expand_kv
from memc.nn.selective import SelectiveMemoryAttention

CLIP = (-10.0, 30.0)  # log-odds range the scorer is fit on (below -10 a token is never needed; above 30 all agree)


def salience_targets(layer: SelectiveMemoryAttention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, T] teacher log-odds (clipped to CLIP) from the site's q [B, Hq, T, D] and k [B, Hkv, T, D]; the
    last ``window`` tokens have no far query in the sequence and get the floor."""
    w, g = layer.cfg.window, layer.groups
    b, hq, t, _ = q.shape
    pos = torch.arange(t, device=q.device)
    causal = pos[None, :] <= pos[:, None]
    far = pos[:, None] - pos[None, :] >= w
    logits = (torch.matmul(q, expand_kv(k, g).transpose(-1, -2)) * layer.scale).masked_fill(~causal, float("-inf"))
    p = torch.softmax(logits, -1)
    lo = torch.log(p.clamp_min(1e-30)) - torch.log1p(-p.clamp(max=0.5))
    top = logits.argmax(-1, keepdim=True)  # only a query's top key can have p > 0.5: its log-odds from the logits
    top_lo = logits.gather(-1, top) - torch.logsumexp(logits.scatter(-1, top, float("-inf")), -1, keepdim=True)
    lo = torch.where(p > 0.5, top_lo.expand_as(lo), lo)
    lo = lo.masked_fill(~far, float("-inf")).amax(-2).clamp(*CLIP)  # [B, Hq, T]
    return lo.reshape(b, hq // g, g, t).amax(2)


def salience_loss(layer: SelectiveMemoryAttention, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the layer's salience against salience_targets, over tokens with a far query."""
    t = q.shape[2]
    with torch.no_grad():
        target = salience_targets(layer, q, k)
    rows = t - layer.cfg.window
    if rows <= 0:
        raise ValueError(f"salience_loss: {t} tokens leave none beyond the window of {layer.cfg.window}")
    return (layer.salience(x) - target)[..., :rows].pow(2).mean()
