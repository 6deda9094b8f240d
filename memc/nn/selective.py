"""SelectiveMemoryAttention: exact sliding-window softmax plus the raw (k, v) of a few salient older tokens.

Why: every feature-map segment memory tried on the recall model recalled 0.03-0.19 (a segment state of F x D
keeps 2S/F times less than the segment's raw KV, so >= 8x smaller needs F <= S/4, too few features to single out
one token). Keeping a few tokens exactly instead recalls them exactly, and the read stays one softmax.

Per KV head (the query heads of a GQA group share its keys and its memory), query t sees key j iff

* window: ``t - window < j <= t``;
* open segment: ``j <= t - window`` and ``j // segment == (t - window) // segment`` (kept raw until it closes);
* pool: ``j`` is a *kept* token of a segment closed before t's open one. When a segment closes, its ``keep``
  highest-salience tokens (ties: the earlier token) become candidates; with ``max_tokens = M > 0`` the pool
  keeps the M highest-salience candidates so far (evicting its lowest: with a fixed capacity the streaming pool
  equals the top-M set of all candidates, which is what the parallel form computes), else every candidate.

Salience is ``score_h(x_j)``, a tiny MLP of the token's own layer input (it cannot see the queries it will serve,
and no position: a rotated key would let it learn position from training text). Reads are exact softmax over the
visible keys with the site's own q, k, v, so before training the layer is window attention plus a random pick.
Trainable: ``scorer`` only (regressed on the teacher's attention, see memc/passes/attention/selective_loss.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memc.nn.mc_parallel import expand_kv, floor_div
from memc.nn.memory_caching import MemoryCachingConfigError, check_head_shape
from memc.nn.selective_state import SelectiveState


def _fail(option: str, message: str) -> None:
    raise MemoryCachingConfigError(f"selective memory option {option!r}: {message}")


@dataclass
class SelectiveConfig:
    """Options of one SelectiveMemoryAttention layer (validated on construction)."""

    variant: ClassVar[str] = "select"  # the memory-caching pass's name for this form (as MemoryCachingConfig.variant)
    window: int  # exact softmax over the last `window` tokens (the token itself included)
    segment: int  # older tokens close in segments of this many (by absolute index // segment)
    keep: int = 0  # candidates per closed segment (0 = all `segment` tokens)
    max_tokens: int = 0  # pool cap (0 = unbounded: the state grows by `keep` tokens per segment)
    scorer_width: int = 32  # hidden width of the salience MLP per KV head

    def __post_init__(self) -> None:
        for name in ("window", "segment", "keep", "max_tokens", "scorer_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(name, f"must be an integer, got {value!r}")
        if self.window < 1:
            _fail("window", f"must be >= 1, got {self.window}")
        if self.segment < 1:
            _fail("segment", f"must be >= 1, got {self.segment}")
        if not 0 <= self.keep <= self.segment:
            _fail("keep", f"must be in 0..segment ({self.segment}; 0 = all), got {self.keep}")
        if self.max_tokens < 0:
            _fail("max_tokens", f"must be >= 0 (0 = unbounded), got {self.max_tokens}")
        if self.scorer_width < 1:
            _fail("scorer_width", f"must be >= 1, got {self.scorer_width}")

    @property
    def per_segment(self) -> int:
        return self.keep or self.segment


def outranks(score_a: torch.Tensor, pos_a: torch.Tensor, score_b: torch.Tensor, pos_b: torch.Tensor) -> torch.Tensor:
    """Whether entry a ranks above entry b: higher salience, ties to the earlier position (one rule, every form)."""
    return (score_a > score_b) | ((score_a == score_b) & (pos_a < pos_b))


class SelectiveMemoryAttention(nn.Module):
    """Window softmax + a salience-selected pool of raw older tokens over a site's (rotated) q, k, v; output like
    sdpa's. ``forward`` is the parallel form (one masked T x T softmax), ``step`` the recurrent form over a
    :class:`SelectiveState`; ``memory_enabled = False`` gives window-only attention (the ablation)."""

    def __init__(self, cfg: SelectiveConfig, *, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int,
                 scale: float | None = None):
        super().__init__()
        check_head_shape(_fail, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         hidden_size=hidden_size)
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size = num_heads, num_kv_heads, head_dim, hidden_size
        self.groups = num_heads // num_kv_heads
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        width = cfg.scorer_width * num_kv_heads
        self.scorer = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, num_kv_heads))
        self.memory_enabled = True

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, window={c.window}, "
                f"segment={c.segment}, keep={c.per_segment}, max_tokens={c.max_tokens or 'unbounded'}, "
                f"memory_enabled={self.memory_enabled}")

    def salience(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, T] scores from x [B, T, hidden]."""
        return self.scorer(x.to(self.scorer[0].weight.dtype)).transpose(1, 2)

    def visible(self, score: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, T, T] bool: key j visible to query i, from the salience [B, Hkv, T]."""
        cfg = self.cfg
        w, c = cfg.window, cfg.segment
        t = score.shape[-1]
        pos = torch.arange(t, device=score.device)
        tq, tk = pos[:, None], pos[None, :]
        window = (tk <= tq) & (tk > tq - w)
        if not self.memory_enabled:
            return window.expand(score.shape[0], score.shape[1], t, t)
        seg_of = floor_div(pos, c)
        open_q = floor_div(pos - w, c)  # each query's open segment (< 0: no memory yet)
        open_vis = (tk <= tq - w) & (seg_of[None, :] == open_q[:, None])
        closed = seg_of[None, :] < open_q[:, None]
        # outr[b, h, j, j']: token j' ranks above token j
        outr = outranks(score.unsqueeze(-2), pos[None, :], score.unsqueeze(-1), pos[:, None])
        same = seg_of[:, None] == seg_of[None, :]
        cand = (outr & same).sum(-1) < cfg.per_segment  # [B, H, T]
        kept = cand.unsqueeze(-2) & closed
        if cfg.max_tokens:
            n_seg = t // c + 2  # >= every segment index, never 1 (as mc_parallel, for a shape-agnostic export)
            onehot = (seg_of[:, None] == torch.arange(n_seg, device=score.device)[None, :]).to(score.dtype)
            per_seg = torch.matmul((outr & cand.unsqueeze(-2)).to(score.dtype), onehot)  # [B, H, T(j), N]
            before = per_seg.cumsum(-1) - per_seg  # outranking candidates in the segments before n
            idx = open_q.clamp(min=0)[None, None, None, :].expand(*before.shape[:3], t)
            count = torch.gather(before, -1, idx).transpose(-1, -2)  # [B, H, T(i), T(j)]
            kept = kept & (count < cfg.max_tokens)
        return window | open_vis | kept

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Parallel form: q [B, Hq, T, D], k, v [B, Hkv, T, D], x [B, T, hidden] -> [B, Hq, T, D]."""
        vis = expand_kv(self.visible(self.salience(x)), self.groups)
        s = torch.matmul(q, expand_kv(k, self.groups).transpose(-1, -2)) * self.scale
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
        return torch.matmul(p, expand_kv(v, self.groups))

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> SelectiveState:
        """The empty state; with ``max_tokens == 0`` the pool starts with 0 slots and grows."""
        c = self.cfg
        return SelectiveState.zeros(batch, self.num_kv_heads, c.window, c.segment, c.max_tokens, self.head_dim,
                                    dtype=dtype, device=device)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, state: SelectiveState,
             ) -> tuple[torch.Tensor, SelectiveState]:
        """One new token (q [B, Hq, 1, D], k, v [B, Hkv, 1, D], x [B, 1, hidden]) -> (y [B, Hq, 1, D], new state)."""
        from memc.nn.selective_step import selective_step

        return selective_step(self, q, k, v, x, state)
