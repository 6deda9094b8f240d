"""Routing consistency and expert-cache metrics over per-token top-k traces: int arrays in, numbers out (no model).

A trace is an int array ``[windows, tokens, k]``: each window is one independent sequence (segments never cross a
window, every cache starts afresh in each one), each row the k distinct experts one token is routed to.

SRP and SCH follow moe-lrc (Liang et al., "Not All Models Suit Expert Offloading", arXiv 2505.16056; the
definitions as its public code computes them):

* SRP(m), segment routing best performance: every segment of m consecutive tokens (every sliding position)
  predicts "expert e serves all m tokens" for each expert that serves at least tau of them, one threshold tau for
  the whole layer. The F1 of those (token, expert) predictions against the real routing, summed over all segments
  before dividing: F1(tau) = 2 sum_{c >= tau} c / (m |{c >= tau}| + k m S) over the S segments' per-expert counts
  c; SRP = max over tau in 0..m (tau = 0 predicts every expert).
* SCH(m, C), segment cache best hit rate: a C-slot cache that knows the routing of the segment starting at the
  current token (it and the next m - 1 tokens) and evicts the resident expert used least often in that segment
  (ties: the least recently used). m = 1 is LRU.

Cache accounting, the same for every policy: tokens in order, each needs its k experts resident at once; a needed
expert that is not resident is a miss and is loaded into a free slot or in place of a resident expert this token
does not need. Filling a still-empty slot counts as a hit (moe-lrc's convention: the cache starts warm), so every
policy scores exactly 1 when C >= E and warm-up does not depend on the policy. LRU evicts the least recently used
expert, LFU the one used least so far (ties: LRU), Belady the one whose next use is furthest away (ties: LRU) --
the best possible hit rate under this accounting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "lfu", "belady")


def as_trace(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """``trace`` checked as [windows, tokens, k] ints in [0, E) with k distinct experts per token."""
    t = np.asarray(trace)
    if t.ndim != 3 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"a trace is an int array [windows, tokens, k], got {t.dtype} {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts})")
    if t.size and (np.diff(np.sort(t, axis=-1), axis=-1) == 0).any():
        raise ValueError("a token's k experts must be distinct")
    return t.astype(np.int64)


def _onehot(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """[W, T, E] int32: 1 where token t of window w is routed to expert e."""
    w, t, _ = trace.shape
    out = np.zeros((w, t, num_experts), np.int32)
    out[np.arange(w)[:, None, None], np.arange(t)[None, :, None], trace] = 1
    return out


def segment_counts(trace: np.ndarray, num_experts: int, m: int) -> np.ndarray:
    """[W, T - m + 1, E]: how many tokens of each m-token segment (every start position) each expert serves."""
    onehot = _onehot(trace, num_experts)
    cs = np.zeros((onehot.shape[0], onehot.shape[1] + 1, num_experts), np.int32)
    np.cumsum(onehot, axis=1, out=cs[:, 1:])
    return cs[:, m:] - cs[:, :-m]


@dataclass(frozen=True)
class SegmentRouting:
    """SRP at one segment length: the best F1, the threshold that reaches it, and how many segments it counts."""

    m: int
    f1: float
    threshold: int
    segments: int

    def as_dict(self) -> dict:
        return {"f1": self.f1, "threshold": self.threshold, "segments": self.segments}


def srp(trace: np.ndarray, num_experts: int, m: int) -> SegmentRouting | None:
    """Segment routing best performance for segments of ``m`` tokens (None when a window is shorter than m)."""
    trace = as_trace(trace, num_experts)
    if m < 1:
        raise ValueError("a segment has at least 1 token")
    if m > trace.shape[1]:
        return None
    counts = segment_counts(trace, num_experts, m)
    hist = np.bincount(counts.ravel(), minlength=m + 1).astype(np.float64)  # (segment, expert) pairs per count
    v = np.arange(m + 1, dtype=np.float64)
    matched = np.cumsum((v * hist)[::-1])[::-1]  # sum of c over pairs with c >= tau
    predicted = m * np.cumsum(hist[::-1])[::-1]  # m tokens predicted per pair with c >= tau
    routed = matched[0]  # k m S
    f1 = 2 * matched / (predicted + routed)
    tau = int(np.argmax(f1))
    return SegmentRouting(m, float(f1[tau]), tau, int(counts.shape[0] * counts.shape[1]))


# --- expert caches ------------------------------------------------------------------------------------------------
def _next_use(seq: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, E]: the first token after t that uses e (T + 1 when none does)."""
    n = seq.shape[0]
    out = np.full((n, num_experts), n + 1, np.int64)
    positions = np.arange(n)
    for e in range(num_experts):
        used = np.flatnonzero((seq == e).any(axis=1))
        after = np.searchsorted(used, positions, side="right")
        out[:, e] = np.append(used, n + 1)[after]
    return out


def _future_counts(seq: np.ndarray, num_experts: int, m: int) -> np.ndarray:
    """[T, E]: how many of tokens t+1 .. t+m-1 use e (the rest of the segment that starts at t)."""
    n = seq.shape[0]
    cs = np.zeros((n + 1, num_experts), np.int64)
    np.cumsum(_onehot(seq[None], num_experts)[0], axis=0, out=cs[1:])
    end = np.minimum(np.arange(n) + m, n)
    return cs[end] - cs[np.arange(n) + 1]


def _window_hits(seq: np.ndarray, num_experts: int, slots: int, policy: str, m: int) -> int:
    """Hits of one window (a [T, k] trace) through a ``slots``-slot cache under ``policy`` (see the module doc).

    Each policy's eviction order is one int per expert, smallest evicted first, with the latest-use stamp in the
    low digits so ties go to the least recently used. LRU, LFU and Belady keys change only when the expert is used
    (an expert's next use stays the same until it is used), SCH's move with every token.
    """
    rows = seq.tolist()
    n = len(rows)
    scale = n * seq.shape[1] + 1  # > every stamp
    key = [0] * num_experts  # the eviction order of the policies whose keys change only on use
    uses = [0] * num_experts
    last = [0] * num_experts
    if policy == "belady":
        table = _next_use(seq, num_experts).tolist()
    elif policy == "sch":
        table = _future_counts(seq, num_experts, m).tolist()
    elif policy not in ("lru", "lfu"):
        raise ValueError(f"unknown cache policy {policy!r}")
    resident: set[int] = set()
    hits = 0
    stamp = 0
    for t, need in enumerate(rows):
        missing = [e for e in need if e not in resident]
        hits += len(need) - len(missing)
        if missing:
            if policy == "sch":
                row = table[t]
                order = {r: row[r] * scale + last[r] for r in resident}.__getitem__
            else:
                order = key.__getitem__
            for e in missing:
                if len(resident) < slots:
                    hits += 1  # a still-empty slot: warm-up, not a miss
                else:
                    resident.remove(min([r for r in resident if r not in need], key=order))
                resident.add(e)
        for e in need:
            stamp += 1
            last[e] = stamp
            uses[e] += 1
            if policy == "lru":
                key[e] = stamp
            elif policy == "lfu":
                key[e] = uses[e] * scale + stamp
            elif policy == "belady":
                key[e] = -table[t][e] * scale + stamp
    return hits


def hit_rate(trace: np.ndarray, num_experts: int, slots: int, policy: str, m: int = 1) -> float:
    """Hit rate of a ``slots``-slot cache per layer under ``policy`` (lru | lfu | belady | sch with segment ``m``)."""
    trace = as_trace(trace, num_experts)
    k = trace.shape[2]
    if slots < k:
        raise ValueError(f"a cache of {slots} slots cannot hold a token's {k} experts")
    if trace.size == 0:
        raise ValueError("the trace is empty")
    hits = sum(_window_hits(w, num_experts, slots, policy, m) for w in trace)
    return hits / trace.size


def sch(trace: np.ndarray, num_experts: int, m: int, slots: int) -> float:
    """Segment cache best hit rate: ``slots`` slots, evictions knowing the routing of the next ``m``-token segment."""
    if m < 1:
        raise ValueError("a segment has at least 1 token")
    return hit_rate(trace, num_experts, slots, "sch", m)


# --- expert load and its divergence between texts -----------------------------------------------------------------
def expert_load(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """[E] float64 summing to 1: the share of all routed (token, expert) pairs each expert serves."""
    trace = as_trace(trace, num_experts)
    counts = np.bincount(trace.ravel(), minlength=num_experts).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def jsd_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 for equal distributions, 1 for disjoint supports)."""
    from scipy.spatial.distance import jensenshannon

    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("two non-empty load distributions over the same experts are needed")
    return float(max(jensenshannon(p, q, base=2.0) ** 2, 0.0))
