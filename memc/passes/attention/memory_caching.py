"""`memory-caching`: replace attention sites by memc's MemoryCachingAttention (bounded-state recurrent form).

Each chosen site's softmax(q k^T) v is replaced by one call of a MemoryCachingAttention submodule that reads the
site's own rotated q, its k / v before any GQA repeat, and the layer input (for the router's low-rank delta).
Everything upstream (projections, rotary) and downstream (o_proj) stays the original graph, so the new layer's
only parameters are its feature maps, router delta, temperatures and biases. At initialisation the router query
is q itself and a segment's logit is log n + q . mean(k) * scale (a Jensen estimate of the segment's attention
mass); `distill-attention` trains it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from memc.errors import PassError
from memc.nn.memory_caching import MemoryCachingAttention, MemoryCachingConfig
from memc.nn.selective import SelectiveConfig, SelectiveMemoryAttention
from memc.passes.attention.sites import SITES_KEY, AttentionSite
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.program import Program
from memc.schema import option

MC_SITES_KEY = "sites.memory_caching"
SUBMODULE = "memory_caching"


@dataclass(frozen=True)
class MemoryCachingSite:
    """A rewritten site: where its MemoryCachingAttention lives and what it replaced."""

    module: str  # the original attention module path
    target: str  # the submodule's path in the program (call_module target)
    replaced: dict[str, Any]  # the AttentionSite it replaced, as a dict

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.module, "target": self.target}


@register_pass
class MemoryCachingRewrite(Pass):
    """Rewrite causal attention sites into memory-caching form (window softmax + cached segment memories)."""

    name = "memory-caching"
    requires = frozenset({SITES_KEY})
    provides = frozenset({MC_SITES_KEY})
    invalidates = frozenset({SITES_KEY})
    tolerance = None  # approximate by design: quality is measured (memc eval, benchmarks/memory_caching.py)

    @dataclass
    class Config:
        sites: list[str] = option(factory=lambda: ["*"], doc="module-path patterns (fnmatch) of the sites to rewrite")
        window: int = option(32, "exact softmax over the last `window` tokens (the token itself included)")
        segment: int = option(64, "older tokens are cached in segments of this many tokens")
        feature_dim: int = option(64, "feature-map dimension of each segment memory (even)")
        variant: Literal["residual", "gated", "soup", "sparse", "select"] = option(
            "gated", "how segment memories are combined; select = keep the raw k, v of the most salient tokens of "
                     "each closed segment (memc/nn/selective.py; reads feature_dim, top_k and the router options "
                     "not, keep and max_tokens instead)")
        keep: int = option(0, "select: candidates kept per closed segment (0 = every token of it)")
        max_tokens: int = option(0, "select: cap on kept tokens per layer and KV head, the lowest-salience one "
                                    "evicted (0 = unbounded); a cap makes the state constant")
        top_k: int = option(4, "sparse: cached segments read per query (plus the open one)")
        max_segments: int = option(0, "cap on cached segments (0 = unbounded); a cap makes the state constant")
        cap_policy: Literal["merge", "evict"] = option("merge", "over the cap: merge the oldest or drop them")
        router_rank: int = option(8, "rank of the trainable delta on the router query (0 = none)")
        router_bias_init: float = option(-4.0, "initial per-head router bias b_h: a segment's mass is scaled by "
                                               "e^b, so a negative value starts the layer at window-only quality "
                                               "(measured on ref-llama: b = 0 is worse than window-only before "
                                               "distillation) and distillation raises it where the memory helps")
        router: Literal["mean_key", "phi_mass", "key_phi", "phi_window"] = option(
            "mean_key", "router logit: mean_key = log n + u . (mean key); phi_mass = log(phi_q . z) / tau, the "
                        "segment's feature-map mass, which one matching token can lift; key_phi = log(phi_q . z) "
                        "+ u . (mean key); phi_window = phi_mass + the query's top window logit "
                        "(memc/nn/memory_caching.py router_logits)")
        weights: str = option("", "safetensors file of trained layers (written by memc.reference.memory_caching) "
                                  "to load instead of the initialisation; its layer options must match these")

        def validate(self) -> None:
            if not self.sites:
                raise ValueError("sites: give at least one module-path pattern ('*' for all)")
            self.layer_config()  # every layer option is checked before any model work

        def layer_config(self) -> MemoryCachingConfig | SelectiveConfig:
            try:
                if self.variant == "select":
                    return SelectiveConfig(window=self.window, segment=self.segment, keep=self.keep,
                                           max_tokens=self.max_tokens)
                return MemoryCachingConfig(
                    window=self.window, segment=self.segment, feature_dim=self.feature_dim, variant=self.variant,
                    top_k=self.top_k, max_segments=self.max_segments, cap_policy=self.cap_policy,
                    router_rank=self.router_rank, router=self.router,
                )
            except ValueError as exc:
                raise ValueError(str(exc).replace("memory caching option ", "").replace(
                    "selective memory option ", "")) from None

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        sites: list[AttentionSite] = program.annotations[SITES_KEY]
        chosen = [s for s in sites if any(fnmatch.fnmatchcase(s.module, p) for p in self.config.sites)]
        if not chosen:
            raise PassError(
                f"{self.option_path('sites')}: {self.config.sites} match no attention site; the sites are "
                f"{', '.join(s.module or '(top level)' for s in sites) or '(none: the model has no attention)'}"
            )
        context = program.source.max_seq_len
        if context is not None and self.config.window >= context:
            raise PassError(
                f"{self.option_path('window')}: {self.config.window} >= the model's context of {context} tokens: "
                "the window would hold every token and nothing would reach the memory"
            )
        for s in chosen:
            _check_site(s, self)
        gm = program.module
        rewritten = [_rewrite(gm, s, self.config, ctx.seed * 1000 + i) for i, s in enumerate(chosen)]
        if self.config.weights:
            load_layer_weights(gm, rewritten, self.config, self.option_path("weights"))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        annotations = {k: v for k, v in program.annotations.items() if k != SITES_KEY}
        annotations[MC_SITES_KEY] = rewritten
        untouched = [s.module for s in sites if s not in chosen]
        metrics = {
            "rewritten": [r.target for r in rewritten], "untouched": untouched,
            "trainable_parameters": sum(p.numel() for r in rewritten for p in gm.get_submodule(r.target).parameters()),
            "layer": layer_options(self.config), "weights": self.config.weights or None,
        }
        return PassResult(program.replace(annotations=annotations), True, metrics)


def layer_options(cfg: "MemoryCachingRewrite.Config") -> dict[str, Any]:
    """The options that shape a layer's parameters and math (what saved weights must agree on)."""
    return {k: v for k, v in vars(cfg).items() if k not in ("sites", "weights")}


def save_layer_weights(path: Path, gm: torch.nn.Module, sites: list[MemoryCachingSite], layer: dict[str, Any]) -> None:
    """Every rewritten layer's parameters in one safetensors file, with the layer options as metadata."""
    from safetensors.torch import save_file

    tensors = {f"{s.target}.{n}": p.detach().contiguous() for s in sites for n, p in gm.get_submodule(s.target).named_parameters()}
    save_file(tensors, str(path), metadata={"memc.layer": json.dumps(layer, sort_keys=True)})


CAP_OPTIONS = ("max_segments", "cap_policy", "max_tokens")


def load_layer_weights(gm: torch.nn.Module, sites: list[MemoryCachingSite], cfg: Any, option: str) -> None:
    from safetensors import safe_open

    path = Path(cfg.weights)
    if not path.is_file():
        raise PassError(f"{option}: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("memc.layer", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise PassError(f"{option}: {path} is not a readable safetensors file: {exc}") from None
    wanted = layer_options(cfg)
    # files written before an option existed were made with its default
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    saved = {**{k: v for k, v in defaults.items() if k in wanted}, **saved}
    # the cap only decides what happens to segments past max_segments: it changes no parameter and may be set
    # at deployment on layers trained without one
    differ = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v and k not in CAP_OPTIONS}
    if differ:
        raise PassError(f"{option}: {path} was trained with other layer options: "
                        + ", ".join(f"{k} = {a!r} there, {b!r} here" for k, (a, b) in sorted(differ.items())))
    for s in sites:
        layer = gm.get_submodule(s.target)
        own = {n: tensors.get(f"{s.target}.{n}") for n, _ in layer.named_parameters()}
        missing = [n for n, t in own.items() if t is None]
        if missing:
            raise PassError(f"{option}: {path} has no weights for {s.target} ({', '.join(missing)})")
        layer.load_state_dict({**layer.state_dict(), **own})


def _check_site(site: AttentionSite, p: Pass) -> None:
    where = f"attention site {site.module or '(top level)'}"
    if not site.causal or site.mask.startswith(("none", "padding")):
        raise PassError(f"{where} is bidirectional (mask {site.mask!r}): memory caching rewrites causal "
                        f"attention only (an encoder has no decode state to bound); exclude it with "
                        f"{p.option_path('sites')}")
    if site.mask != "causal":
        raise PassError(f"{where} has a {site.mask!r} mask: memory caching replaces plain causal attention only")
    if site.sinks or site.softcap:
        raise PassError(f"{where} uses attention sinks or a logit soft-cap, which the memory-caching form does "
                        "not reproduce yet")
    if p.config.variant == "select" and site.hidden is None:
        raise PassError(f"{where}: its layer input is not a [batch, seq, hidden] tensor, so the select variant's "
                        "salience scorer has nothing to read")
    if p.config.variant != "select" and p.config.router_rank and site.hidden is None:
        raise PassError(f"{where}: its layer input is not a [batch, seq, hidden] tensor, so the router delta has "
                        f"nothing to read; set {p.option_path('router_rank')} = 0")


def _rewrite(gm: torch.fx.GraphModule, site: AttentionSite, cfg: "MemoryCachingRewrite.Config", seed: int) -> MemoryCachingSite:
    nodes = {n.name: n for n in gm.graph.nodes}
    out = nodes[site.out]
    q, k, v = nodes[site.q], nodes[site.k_heads], nodes[site.v_heads]
    hidden = nodes[site.hidden] if site.hidden else None
    hidden_size = int(hidden.meta["val"].shape[-1]) if hidden is not None else 1
    kind = SelectiveMemoryAttention if cfg.variant == "select" else MemoryCachingAttention
    with torch.random.fork_rng(devices=[]):  # each layer's initialisation depends on the seed and its index only
        torch.manual_seed(seed)
        layer = kind(
            cfg.layer_config(), num_heads=site.num_heads, num_kv_heads=site.num_kv_heads, head_dim=site.head_dim,
            hidden_size=hidden_size, scale=site.scale,
        )
        if kind is MemoryCachingAttention:
            with torch.no_grad():
                layer.router_bias.fill_(cfg.router_bias_init)
    ref = next(iter(gm.parameters()), None)
    if ref is not None:
        layer = layer.to(dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    target = f"{site.module}.{SUBMODULE}" if site.module else SUBMODULE
    gm.add_submodule(target, layer)
    with gm.graph.inserting_before(out):
        call = gm.graph.call_module(target, (q, k, v, hidden))
    call.meta = {k_: v_ for k_, v_ in out.meta.items() if k_ in ("val", "tensor_meta", "stack_trace")}
    stack = dict(out.meta.get("nn_module_stack") or {})
    stack[target] = (target, f"{kind.__module__}.{kind.__qualname__}")
    call.meta["nn_module_stack"] = stack
    out.replace_all_uses_with(call)
    gm.graph.erase_node(out)  # sdpa counts as impure (seeded dropout), so dead-code elimination would keep it
    return MemoryCachingSite(site.module, target, site.as_dict())
