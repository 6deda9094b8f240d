"""MoESite: one Mixture-of-Experts layer as found in the exported graph (what prune / calibrate / inspect read)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# How the router turns logits into the k gate weights:
#   softmax-topk    softmax over all E, top-k of the probabilities (optionally renormalised over the k)
#   topk-softmax    top-k of the logits, softmax over the k (GPT-OSS)
#   sigmoid         sigmoid scores (+ correction bias for the choice), top-k (optionally grouped, DeepSeek-V3)
SCORE_FUNCTIONS = ("softmax-topk", "topk-softmax", "sigmoid")


@dataclass
class MoESite:
    """Everything memc knows about one MoE layer; node names refer to ``Program.module.graph``."""

    path: str  # the MoE block's module path, e.g. model.layers.0.mlp
    layer: int  # index among the program's MoE layers (0-based, graph order)
    router_path: str  # module owning the router weight
    router_weight: str  # attribute name (get_attr target) of the [E, H] router weight
    router_bias: str | None
    correction_bias: str | None  # DeepSeek-V3 e_score_correction_bias (choice only, not the gate weight)
    num_experts: int
    top_k: int
    hidden_size: int
    score: str  # one of SCORE_FUNCTIONS
    renormalize: bool  # gate weights divided by their sum over the k
    scaling: float  # constant factor on the gate weights (DeepSeek routed_scaling_factor), 1.0 if none
    groups: int  # expert groups (DeepSeek n_group); 1 = ungrouped
    topk_groups: int  # groups kept per token (DeepSeek topk_group)
    experts_form: str  # "fused" (3-D tensors indexed by expert id) | "modulelist" (one module per expert)
    expert_params: list[str]  # fused: attributes with leading dim E; modulelist: every expert's attributes
    expert_modules: list[str]  # modulelist: module path of expert e at position e; fused: [] (one module)
    shared_modules: list[str]  # always-on experts / shared-expert gates inside the block
    expert_bytes: int  # bytes of all routed experts' tensors in this layer
    router_node: str  # the aten.linear producing the logits
    choice_node: str  # the tensor whose top-k picks experts, before any group mask (masking point)
    topk_node: str  # the aten.topk that selects the k experts
    indices_node: str  # its indices output (getitem 1)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_expert(self) -> int:
        return self.expert_bytes // max(self.num_experts, 1)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self) -> dict[str, Any]:
        """The short form `memc inspect` and reports show."""
        return {
            "layer": self.layer,
            "module": self.path,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "score": self.score,
            "renormalize": self.renormalize,
            "scaling": self.scaling,
            "groups": f"{self.topk_groups}/{self.groups}" if self.groups > 1 else "-",
            "router_bias": self.router_bias is not None,
            "correction_bias": self.correction_bias is not None,
            "experts_form": self.experts_form,
            "shared": self.shared_modules,
            "expert_bytes": self.expert_bytes,
        }
