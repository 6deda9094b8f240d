"""Where a decode step's logits go: slots of a preallocated block, each step a slot of its own.

A step's logits must stay valid after the next step (callers keep them), so the engine cannot return the one
array it binds as the graph's output; it copies them out. Into a fresh ``np.empty`` that was the engine's
largest own cost next to a small model's graph: right after another runtime churned the heap (torch eager, in
the decode benchmark) one 16 KB allocation took ~70 us, the graph ~1.2 ms (measured in benchmarks.decode's
schedule). A block of slots is allocated, and its pages touched, once per many steps instead; a slot is never
reused, so every returned array keeps its values, and a block is freed with the last of its slots.
"""
from __future__ import annotations

import numpy as np

BLOCK_BYTES = 1 << 20  # one block per this many bytes of logits (at least one slot)


class LogitSlots:
    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self._block: np.ndarray | None = None
        self._next = 0

    def take(self, batch: int, vocab: int) -> np.ndarray:
        """A new [batch, 1, vocab] array no earlier call returned."""
        block = self._block
        if block is None or self._next == block.shape[0] or block.shape[1:] != (batch, 1, vocab):
            per = batch * vocab * np.dtype(self.dtype).itemsize
            block = np.empty((max(1, BLOCK_BYTES // per), batch, 1, vocab), self.dtype)
            block.fill(0)  # touch the pages now, not in a step
            self._block, self._next = block, 0
        slot = block[self._next]
        self._next += 1
        return slot
