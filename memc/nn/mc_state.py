"""The recurrent (decode) state of one MemoryCachingAttention layer: a fixed, ordered list of plain tensors.

Layout (B batch, H = num_kv_heads, W = window, F = feature_dim, D = head_dim, M = cached slots):

======== ================ =====================================================================================
name     shape            meaning
======== ================ =====================================================================================
t        [] int64         tokens seen so far (all sequences of the batch advance together)
win_k    [B, H, W, D]     window ring buffer: ring slot s holds the newest position p < t with p % W == s;
win_v    [B, H, W, D]     a slot is valid iff that p >= 0 (derived from ``t``; empty slots hold zeros)
open_s   [B, H, F, D]     open segment: sum phi_k(k_j) v_j^T over its tokens (those that left the window)
open_z   [B, H, F]        sum phi_k(k_j)
open_ksum [B, H, D]       sum k_j (the router's mean key is open_ksum / open_n)
open_n   [B, H]           number of tokens (0 = no open segment yet)
slot_s   [B, H, M, F, D]  closed segments, oldest first; with the merge cap slot 0 is the sum of every segment
slot_z   [B, H, M, F]     older than the newest M - 1 (see memory_caching.py for the exact rule)
slot_ksum [B, H, M, D]
slot_n   [B, H, M]        tokens per slot (0 = empty slot)
======== ================ =====================================================================================

With ``max_segments > 0`` no shape depends on the context length, so the decode graph takes and returns these
tensors as ONNX inputs/outputs. With ``max_segments == 0`` (unbounded) M is the number of closed segments and grows
by one every ``segment`` tokens (eager decode only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from memc.nn.flat_state import FlatState, checked

FIELDS = (
    "t", "win_k", "win_v", "open_s", "open_z", "open_ksum", "open_n", "slot_s", "slot_z", "slot_ksum", "slot_n",
)


@checked
@dataclass
class MemoryCachingState(FlatState):
    FIELDS: ClassVar[tuple[str, ...]] = FIELDS

    t: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    open_s: torch.Tensor
    open_z: torch.Tensor
    open_ksum: torch.Tensor
    open_n: torch.Tensor
    slot_s: torch.Tensor
    slot_z: torch.Tensor
    slot_ksum: torch.Tensor
    slot_n: torch.Tensor

    @staticmethod
    def zeros(
        batch: int, kv_heads: int, window: int, head_dim: int, feature_dim: int, slots: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> "MemoryCachingState":
        b, h, w, d, f, m = batch, kv_heads, window, head_dim, feature_dim, slots
        z = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return MemoryCachingState(
            t=torch.zeros((), dtype=torch.int64, device=device),
            win_k=z(b, h, w, d), win_v=z(b, h, w, d),
            open_s=z(b, h, f, d), open_z=z(b, h, f), open_ksum=z(b, h, d), open_n=z(b, h),
            slot_s=z(b, h, m, f, d), slot_z=z(b, h, m, f), slot_ksum=z(b, h, m, d), slot_n=z(b, h, m),
        )
