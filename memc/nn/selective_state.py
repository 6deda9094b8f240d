"""The recurrent (decode) state of one SelectiveMemoryAttention layer: a fixed, ordered list of plain tensors.

Layout (B batch, H = num_kv_heads, W = window, S = segment, M = pool slots, D = head_dim):

=========== ============ ==================================================================================
name        shape        meaning
=========== ============ ==================================================================================
t           [] int64     tokens seen so far (all sequences of the batch advance together)
win_k/v     [B, H, W, D] window ring buffer: slot s holds the newest position p < t with p % W == s
win_score   [B, H, W]    each window token's salience (computed when it entered; needed when it leaves)
open_k/v    [B, H, S, D] open segment, raw: slot s holds position o * S + s, valid for s <= (t - 1 - W) % S
open_score  [B, H, S]    (o = (t - 1 - W) // S; no slot is valid while t - 1 < W)
pool_k/v    [B, H, M, D] kept tokens, ordered by rank (best first); an empty slot has pool_pos = 0
pool_score  [B, H, M]
pool_pos    [B, H, M]    int64 absolute position + 1 (ties in salience go to the earlier one; 0 = empty)
=========== ============ ==================================================================================

With ``max_tokens > 0`` no shape depends on the context length (M = max_tokens); with 0 the pool axis grows by
``keep`` per closed segment (eager decode only). The empty state is all zeros (hence position + 1), so a runtime
that knows only the shapes and dtypes (memc.runtime.engine) can make it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from memc.nn.flat_state import FlatState, checked

FIELDS = ("t", "win_k", "win_v", "win_score", "open_k", "open_v", "open_score", "pool_k", "pool_v", "pool_score",
          "pool_pos")


@checked
@dataclass
class SelectiveState(FlatState):
    FIELDS: ClassVar[tuple[str, ...]] = FIELDS

    t: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_score: torch.Tensor
    open_k: torch.Tensor
    open_v: torch.Tensor
    open_score: torch.Tensor
    pool_k: torch.Tensor
    pool_v: torch.Tensor
    pool_score: torch.Tensor
    pool_pos: torch.Tensor

    @staticmethod
    def zeros(batch: int, kv_heads: int, window: int, segment: int, slots: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "SelectiveState":
        b, h, d = batch, kv_heads, head_dim
        z = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return SelectiveState(
            t=torch.zeros((), dtype=torch.int64, device=device),
            win_k=z(b, h, window, d), win_v=z(b, h, window, d), win_score=z(b, h, window),
            open_k=z(b, h, segment, d), open_v=z(b, h, segment, d), open_score=z(b, h, segment),
            pool_k=z(b, h, slots, d), pool_v=z(b, h, slots, d), pool_score=z(b, h, slots),
            pool_pos=torch.zeros((b, h, slots), dtype=torch.int64, device=device),
        )
