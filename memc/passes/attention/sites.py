"""AttentionSite: what detection learned about one attention computation, published as ``sites.attention``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SITES_KEY = "sites.attention"


@dataclass(frozen=True)
class AttentionSite:
    """One attention site of a captured graph, attributable to its owning module.

    Node fields hold fx node names in the program's graph (valid until a pass rewrites that part of the graph).
    ``k`` / ``v`` are the tensors the computation consumes (after any GQA repeat); ``k_heads`` / ``v_heads`` are
    the same tensors before the repeat, with ``num_kv_heads`` heads: a rewrite that shares k/v across the query
    group reads those. ``hidden`` is the layer input that feeds the query projection (None when it is not a
    [batch, seq, hidden] tensor, e.g. nn.MultiheadAttention's seq-first layout).
    """

    module: str  # owning module path, e.g. model.layers.0.self_attn
    kind: str  # sdpa | eager
    q: str
    k: str
    v: str
    out: str  # the node whose value is the attention output (sdpa node, or the probs @ v matmul)
    k_heads: str
    v_heads: str
    hidden: str | None
    q_weight: str | None  # parameter name of the query projection (when found)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    mask: str  # none | causal | sliding | padding | causal+padding | sliding+padding | custom
    window: int | None  # sliding-window width in tokens (query included), when the mask is a band
    rotary: bool
    scale: float
    sinks: bool = False
    softcap: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def site_rows(sites: list[AttentionSite]) -> list[dict[str, Any]]:
    """The columns `memc inspect` shows (``attention_sites`` in --json carries every field)."""
    rows = []
    for s in sites:
        extras = [e for e, on in (("sinks", s.sinks), (f"softcap {s.softcap:g}" if s.softcap else "", s.softcap)) if on]
        rows.append({
            "module": s.module or "(top level)", "kind": s.kind, "heads": s.num_heads, "kv": s.num_kv_heads,
            "dim": s.head_dim, "mask": s.mask, "win": s.window, "rope": "yes" if s.rotary else "no",
            "scale": f"{s.scale:.3g}", "extras": ", ".join(extras),
        })
    if not any(r["extras"] for r in rows):
        for r in rows:
            del r["extras"]
    return rows
