"""MemoryCachingAttention: exact sliding-window softmax attention plus cached, gated, compressed segment memories.

Replaces one softmax-attention site (Memory Caching, Behrouz et al. 2026; LoLCATs-style window + linear memory).
Per KV head (the query heads of a GQA group share its k/v and its memory), for query position t, with
``s_tj = q_t . k_j * scale``:

* window ``W_t = {j : t - window < j <= t}``: exact softmax terms ``e^{s_tj} v_j``;
* memory: tokens ``j <= t - window``, in segments ``i = j // segment`` (by absolute index). The open segment of
  query t is ``(t - window) // segment`` (only its tokens ``j <= t - window``); older segments are closed. Each
  keeps ``S_i = sum phi_k(k_j) v_j^T``, ``z_i = sum phi_k(k_j)``, the key sum and the count ``n_i``;
* segment read ``v~_ti = phi_q(q_t)^T S_i / (phi_q(q_t)^T z_i + eps)``;
* router query ``u_t = q_t + B(A(x_t))`` (B zero-initialised), router logit
  ``r_ti = log n_i + (u_t . kbar_i) * scale / tau_h + b_h`` (kbar = key sum / n, tau_h = exp(log_tau_h));
* ``y_t = [sum_W e^s v + sum_{i in R_t} e^{r_ti} v~_ti] / [sum_W e^s + sum_{i in R_t} e^{r_ti}]``, computed with
  one shared running max.

Variants: ``gated`` (GRM): R_t = every cached slot + the open segment; ``residual``: ``r_ti = log n_i + b_h``;
``soup``: one read of the mixture ``S~ = sum w_i S_i``, ``z~ = sum w_i z_i`` with ``w = softmax_i(r_ti)``, mass
``logsumexp_i r_ti``; ``sparse`` (SSC): the ``top_k`` cached slots by ``r`` (ties: the older slot wins) plus the
open segment.

Cap rule (``max_segments = M > 0``), identical in the parallel, prefill and step forms: with ``n_c`` closed
segments and ``n_c > M``,

* ``merge``: slot 0 holds the SUM of segments ``0 .. n_c - M`` (S, z, key sums and counts add, so its mean key is
  count-weighted); slots ``1 .. M-1`` are segments ``n_c - M + 1 .. n_c - 1``. The step form gets there by
  adding slot 1 into slot 0 and shifting the others down each time a segment closes into a full cache;
* ``evict``: slots ``0 .. M-1`` are segments ``n_c - M .. n_c - 1``; older ones are dropped.

A segment closes when the first token of the next segment leaves the window, so at most M + 1 memory reads per
query and the decode state has a fixed size (see mc_state.py).

Trainable parameters (the only ones; q, k, v come from the replaced site): ``phi_q.weight`` [Hq, D, F/2] (one
feature map per query head), ``phi_k.weight`` [Hkv, D, F/2] (per KV head: the memory is per KV head),
``router_a.weight`` [rank, hidden], ``router_b.weight`` [Hq * D, rank] (zero at init), ``log_tau`` [Hq] and
``router_bias`` [Hq] (both zero at init). Window dropout acts in ``forward`` / ``prefill`` in training mode only,
never in ``step``. The sparse router ranks slots pairwise (O(T N^2) booleans for N segments), so keep
``segment`` >> 1 with ``variant="sparse"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from memc.errors import ConfigError
from memc.nn.feature_maps import HedgehogFeatureMap
from memc.nn.mc_state import MemoryCachingState

VARIANTS = ("residual", "gated", "soup", "sparse")
CAP_POLICIES = ("merge", "evict")
ROUTERS = ("mean_key", "phi_mass", "key_phi", "phi_window")


class MemoryCachingConfigError(ConfigError, ValueError):
    """A bad MemoryCachingAttention option; a ValueError for torch code, a ConfigError (exit 2) for the CLI."""


def _fail(option: str, message: str) -> None:
    raise MemoryCachingConfigError(f"memory caching option {option!r}: {message}")


def check_head_shape(fail, **sizes: int) -> None:
    """The attention shape options every memc layer takes: each >= 1, and KV heads dividing query heads."""
    for name, value in sizes.items():
        if value < 1:
            fail(name, f"must be >= 1, got {value}")
    if sizes["num_heads"] % sizes["num_kv_heads"]:
        fail("num_kv_heads", f"must divide num_heads ({sizes['num_heads']}), got {sizes['num_kv_heads']}")


@dataclass
class MemoryCachingConfig:
    """Options of one MemoryCachingAttention layer (validated on construction)."""

    window: int  # exact softmax over the last `window` tokens (the token itself included)
    segment: int  # tokens older than the window go to segments of this many tokens (by absolute index // segment)
    feature_dim: int = 64  # F: output dim of phi_q / phi_k (even: [softmax(xW) ++ softmax(-xW)])
    variant: Literal["residual", "gated", "soup", "sparse"] = "gated"
    top_k: int = 4  # sparse: cached slots read per query (plus the open segment)
    max_segments: int = 0  # 0 = unbounded; else at most this many cached slots (see cap_policy)
    cap_policy: Literal["merge", "evict"] = "merge"
    router_rank: int = 8  # rank of the zero-initialised delta on the router query (0 = none)
    window_dropout: float = 0.0  # training only: drop each window key but the token itself with this probability
    eps: float = 1e-12  # added to a segment read's denominator phi_q^T z (always > 0 for the Hedgehog map)
    router: Literal["mean_key", "phi_mass", "key_phi", "phi_window"] = "mean_key"  # the router logit's form (see router_logits)

    def __post_init__(self) -> None:
        for name in ("window", "segment", "feature_dim", "top_k", "max_segments", "router_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(name, f"must be an integer, got {value!r}")
        if self.window < 1:
            _fail("window", f"must be >= 1, got {self.window}")
        if self.segment < 1:
            _fail("segment", f"must be >= 1, got {self.segment}")
        if self.feature_dim < 2 or self.feature_dim % 2:
            _fail("feature_dim", f"must be an even number >= 2, got {self.feature_dim}")
        if self.variant not in VARIANTS:
            _fail("variant", f"must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.top_k < 1:
            _fail("top_k", f"must be >= 1, got {self.top_k}")
        if self.max_segments < 0:
            _fail("max_segments", f"must be >= 0 (0 = unbounded), got {self.max_segments}")
        if self.cap_policy not in CAP_POLICIES:
            _fail("cap_policy", f"must be one of {', '.join(CAP_POLICIES)}, got {self.cap_policy!r}")
        if self.router_rank < 0:
            _fail("router_rank", f"must be >= 0, got {self.router_rank}")
        if not 0.0 <= float(self.window_dropout) < 1.0:
            _fail("window_dropout", f"must be in [0, 1), got {self.window_dropout}")
        if not float(self.eps) >= 0.0:
            _fail("eps", f"must be >= 0, got {self.eps}")
        if self.router not in ROUTERS:
            _fail("router", f"must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.router != "mean_key" and self.variant == "residual":
            _fail("router", f"{self.router!r} needs a query-dependent variant (the residual router is log n + b)")

    @property
    def query_router(self) -> bool:
        """Whether router logits read the router query u and the segments' key sums (the mean-key router)."""
        return self.variant != "residual" and self.router in ("mean_key", "key_phi")

    @property
    def mass_router(self) -> bool:
        """Whether router logits read the feature-map mass phi_q^T z_i (which sees single tokens)."""
        return self.variant != "residual" and self.router in ("phi_mass", "key_phi", "phi_window")


class MemoryCachingAttention(nn.Module):
    """Window softmax + segment memories over an attention site's (rotated) q, k, v; output like sdpa's.

    ``forward`` / ``prefill`` are the chunked-parallel form (masked T x T matmuls, no loop over tokens or
    segments); ``step`` is the recurrent form over a :class:`MemoryCachingState`. ``memory_enabled = False``
    gives window-only attention with the same weights (the ablation).
    """

    def __init__(
        self, cfg: MemoryCachingConfig, *, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int,
        scale: float | None = None,
    ):
        super().__init__()
        check_head_shape(_fail, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         hidden_size=hidden_size)
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size = (
            num_heads, num_kv_heads, head_dim, hidden_size)
        self.groups = num_heads // num_kv_heads
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.phi_q = HedgehogFeatureMap(num_heads, head_dim, cfg.feature_dim)
        self.phi_k = HedgehogFeatureMap(num_kv_heads, head_dim, cfg.feature_dim)
        if cfg.router_rank and cfg.router not in ("phi_mass", "phi_window"):  # these read no router query
            self.router_a = nn.Linear(hidden_size, cfg.router_rank, bias=False)
            self.router_b = nn.Linear(cfg.router_rank, num_heads * head_dim, bias=False)
            nn.init.zeros_(self.router_b.weight)
        else:
            self.router_a = self.router_b = None
        self.log_tau = nn.Parameter(torch.zeros(num_heads))
        self.router_bias = nn.Parameter(torch.zeros(num_heads))
        self.memory_enabled = True

    def extra_repr(self) -> str:
        c = self.cfg
        cap = f"max_segments={c.max_segments} ({c.cap_policy})" if c.max_segments else "unbounded"
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={c.window}, segment={c.segment}, feature_dim={c.feature_dim}, variant={c.variant}, {cap}, "
                f"memory_enabled={self.memory_enabled}")

    # --- pieces shared by the parallel, step and naive forms ----------------------------------------------------
    def router_query(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``u = q + reshape(B(A(x)))``: [B, Hq, T, D] from q [B, Hq, T, D] and x [B, T, hidden]."""
        if self.router_a is None:
            return q
        b, t = x.shape[0], x.shape[1]
        delta = self.router_b(self.router_a(x.to(self.router_a.weight.dtype))).to(q.dtype)
        return q + delta.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def head_param(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A per-query-head parameter [Hq] shaped [1, Hq, 1, 1] for [B, Hq, T, slots] logits."""
        return p.to(dtype).reshape(1, self.num_heads, 1, 1)

    def router_logits(self, n: torch.Tensor, keydot: torch.Tensor | None, valid: torch.Tensor,
                      den: torch.Tensor | None = None, wmax: torch.Tensor | None = None) -> torch.Tensor:
        """On valid slots (-inf elsewhere), with ``m = phi_q^T z + eps`` the segment's feature-map mass (a sum over
        its tokens, so one matching token can lift it):

        * mean_key: ``r = log n + (u . keysum / n) * scale / tau + b``;
        * phi_mass: ``r = log m / tau + b`` (tau = 1 is the LoLCATs hybrid, tau < 1 sharpens the routing; no
          absolute scale, so it cannot follow attention logits of ~100 nats);
        * key_phi: ``r = log m + (u . keysum / n) * scale / tau + b``: the mean key gives the scale, the
          feature-map mass (in place of the count) tells segments apart token by token;
        * phi_window: ``r = log m / tau + b + wmax``, ``wmax`` [B, Hq, T] the query's largest window logit
          (detached): phi_mass measured against the window's top term, so b alone sets the memory's share
          whatever the scale of the attention logits.
        """
        n_safe = torch.where(valid, n, torch.ones_like(n))
        tau = torch.exp(self.head_param(self.log_tau, n.dtype))
        if self.cfg.mass_router:
            if den is None:
                raise ValueError(f"the {self.cfg.router} router needs the slots' feature-map mass (den)")
            log_m = torch.log(torch.where(valid, den + self.cfg.eps, torch.ones_like(den)))
            if self.cfg.router in ("phi_mass", "phi_window"):
                r = log_m / tau + self.head_param(self.router_bias, n.dtype)
                if self.cfg.router == "phi_window":
                    if wmax is None:
                        raise ValueError("the phi_window router needs the query's largest window logit (wmax)")
                    r = r + wmax.detach().unsqueeze(-1)
                return r.masked_fill(~valid, float("-inf"))
            r = log_m + self.head_param(self.router_bias, n.dtype)
        else:
            r = torch.log(n_safe) + self.head_param(self.router_bias, n.dtype)
        if keydot is not None:
            r = r + keydot / n_safe * (self.scale / tau)
        return r.masked_fill(~valid, float("-inf"))

    def select_sparse(self, r: torch.Tensor, closed: torch.Tensor, is_open: torch.Tensor) -> torch.Tensor:
        """Sparse routing: keep the ``top_k`` valid closed slots by logit (ties: lower slot index) and the open one.

        Written as a rank count rather than ``topk`` so ties break the same way in every form and ``k`` never
        depends on the sequence length (the ONNX graph stays shape-agnostic).
        """
        rc = r.masked_fill(~closed, float("-inf"))
        idx = torch.arange(r.shape[-1], device=r.device)
        other, this = rc.unsqueeze(-2), rc.unsqueeze(-1)
        before = (other > this) | ((other == this) & (idx[None, :] < idx[:, None]))
        rank = before.sum(-1)
        keep = (closed & (rank < self.cfg.top_k)) | is_open
        return r.masked_fill(~keep, float("-inf"))

    def read_weights(self, r: torch.Tensor, den: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slot weights ``a`` on ``phi_q^T S_i`` and the memory mass (relative to the running max ``m``).

        gated / residual / sparse: ``a_i = e^{r_i - m} / (phi_q^T z_i + eps)``; soup: one normalised read of the
        mixture, ``a_i = e^{r_i - m} / (sum_i w_i phi_q^T z_i + eps)`` with ``w = softmax(r)``. Both have mass
        ``sum_i e^{r_i - m}``.
        """
        e = torch.exp(r - m.unsqueeze(-1))
        mass = e.sum(-1)
        live = e > 0
        if self.cfg.variant == "soup":
            # w = softmax(r) from r's own max, not the running max m: e = e^{r - m} can be subnormal when the
            # memory is far below the window scores, and dividing by sum(e) then overflows in the backward pass
            # (NaN gradients). The shift cancels in w exactly, so it carries no gradient (detached).
            top = r.amax(-1, keepdim=True).detach()
            has = torch.isfinite(top)
            w = torch.exp(r - torch.where(has, top, torch.zeros_like(top)))
            total = torch.where(has, w.sum(-1, keepdim=True), torch.ones_like(top))
            dbar = (w * den).sum(-1, keepdim=True) / total + self.cfg.eps
            return e / dbar, mass
        den_safe = torch.where(live, den + self.cfg.eps, torch.ones_like(den))
        return e / den_safe, mass

    # --- the three forms -----------------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Chunked-parallel form over positions 0..T-1: q [B, Hq, T, D], k, v [B, Hkv, T, D], x [B, T, hidden]."""
        from memc.nn.mc_parallel import parallel_forward

        return parallel_forward(self, q, k, v, x, window_dropout=self._window_dropout())

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                ) -> tuple[torch.Tensor, MemoryCachingState]:
        """``forward`` plus the decode state after these T tokens, both built in parallel."""
        from memc.nn.mc_parallel import parallel_forward, parallel_state

        y = parallel_forward(self, q, k, v, x, window_dropout=self._window_dropout())
        return y, parallel_state(self, k, v)

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> MemoryCachingState:
        """The empty state (0 tokens seen); with ``max_segments == 0`` it starts with 0 cached slots."""
        c = self.cfg
        return MemoryCachingState.zeros(batch, self.num_kv_heads, c.window, self.head_dim, c.feature_dim,
                                        c.max_segments, dtype=dtype, device=device)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, state: MemoryCachingState,
             ) -> tuple[torch.Tensor, MemoryCachingState]:
        """One new token (q [B, Hq, 1, D], k, v [B, Hkv, 1, D], x [B, 1, hidden]) -> (y [B, Hq, 1, D], new state).

        Window dropout never applies here. With a cap, this is torch.export-able with the state as plain tensors;
        without one (``max_segments == 0``) the slot axis grows by one per closed segment (eager decode only).
        """
        from memc.nn.mc_step import recurrent_step

        return recurrent_step(self, q, k, v, x, state)

    def _window_dropout(self) -> float:
        return float(self.cfg.window_dropout) if self.training else 0.0
