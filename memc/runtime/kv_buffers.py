"""Bookkeeping of the KV buffers behind a preallocated decode graph's states (memc.runtime.engine).

A preallocated graph (onnxruntime GroupQueryAttention) writes new keys / values into buffers of a capacity; a state's
KV arrays are views of them. Only the newest view of a buffer may extend it in place; stepping any older state (a
branch) copies the buffer first, so every state the engine returned stays valid.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CAPACITY_STEP = 256  # preallocated KV buffers: capacity rounded up to this, doubled when full


@dataclass(slots=True)
class Last:
    """The state the engine returned last: its list and arrays (to recognise it when it comes back), its batch and
    past length, and (preallocated graphs) the KV buffers its arrays view, in state order."""

    state: list
    arrays: tuple
    batch: int
    past: int
    buffers: tuple = ()
    views: tuple = ()  # the arrays viewing ``buffers``, in the same order
    capacity: int = 0  # the smallest buffer's

    def __post_init__(self) -> None:
        if self.buffers and not self.capacity:
            self.capacity = min(b.shape[2] for b in self.buffers)

    def is_(self, state: Sequence[np.ndarray], batch: int) -> bool:
        if state is not self.state or batch != self.batch or len(state) != len(self.arrays):
            return False
        for a, b in zip(state, self.arrays):
            if a is not b:
                return False
        return True


class Buffers:
    """The KV buffers behind a preallocated graph's states, each with the one view of it that is a state's newest
    array (the only array that may extend the buffer in place: any other view is an older state, a branch).

    The newest views of the last state's buffers are that state's arrays (``Last``); a buffer is recorded here
    when the last state moves to other buffers, so a decode loop's steps record nothing."""

    def __init__(self) -> None:
        self._latest: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(buffer) -> (buffer, newest view)

    def mark(self, buf: np.ndarray, view: np.ndarray) -> None:
        if len(self._latest) > 64:  # forget buffers that are gone
            self._latest = {k: v for k, v in self._latest.items() if v[0]() is not None}
        self._latest[id(buf)] = (weakref.ref(buf), weakref.ref(view))

    def leave(self, old: Last | None, new_buffers: tuple) -> None:
        """``old`` stops being the last state: record its arrays as the newest views of its buffers that the new
        last state does not use."""
        if old is None or old.buffers is new_buffers:
            return
        for buf, view in zip(old.buffers, old.views):
            if not any(buf is b for b in new_buffers):
                self.mark(buf, view)

    def newest(self, buf: np.ndarray, last: Last | None) -> np.ndarray | None:
        if last is not None:
            for b, a in zip(last.buffers, last.views):
                if b is buf:
                    return a
        entry = self._latest.get(id(buf))
        return entry[1]() if entry is not None and entry[0]() is buf else None

    def buffer_for(self, array: np.ndarray, needed: int, limit: int | None, last: Last | None) -> np.ndarray:
        """A buffer holding ``array`` [b, h, past, d] in its first ``past`` positions with room for ``needed``:
        the array's own buffer when ``array`` is that buffer's newest view, else a copy (a grown one if needed)."""
        base = array.base
        if base is not None and base.ndim == 4 and base.shape[2] >= needed and self.newest(base, last) is array:
            return base
        old = base.shape[2] if isinstance(base, np.ndarray) and base.ndim == 4 else 0
        capacity = max(2 * old, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
        capacity = max(needed, min(capacity, limit) if limit else capacity)
        buf = np.empty((*array.shape[:2], capacity, array.shape[3]), dtype=array.dtype)
        buf[:, :, :array.shape[2]] = array
        return buf
