"""`detect-attention`: find every attention site of the captured graph and publish it as ``sites.attention``.

Two shapes of attention reach an exported graph: one ``aten.scaled_dot_product_attention`` node (transformers'
sdpa implementation, nn.MultiheadAttention) or the eager chain ``q @ k^T -> scale / mask / softcap / sinks ->
softmax -> @ v`` (eager implementations, hand-written models). A softmax counts only when its logits come from a
product of two activations and its probabilities multiply a third, so MoE routers and output softmaxes (whose
logits come from a weight matrix) are never sites. Masks are classified from their values on probe inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from memc.capture.inputs import resized_inputs
from memc.graph_values import node_values
from memc.passes.attention.masks import MaskInfo, allowed_pattern, classify
from memc.passes.attention.sites import SITES_KEY, AttentionSite
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.program import Program, module_path
from memc.schema import option

aten = torch.ops.aten
_SDPA = {aten.scaled_dot_product_attention.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
# ops allowed between the score product and the softmax
_SCORE_OPS = {
    aten.div.Tensor, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.where.self, aten.tanh.default, aten.to.dtype, aten._to_copy.default,
    aten.clone.default, aten.contiguous.default, aten.cat.default,
}
# ops allowed between the softmax and the probs @ v product
_PROB_OPS = {
    aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.clone.default, aten.contiguous.default,
    aten.slice.Tensor, aten.type_as.default,
}
_SHAPE_OPS = {aten.sym_size.int, aten.sym_numel.default}


def _fn(node: Any, targets: set) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: torch.fx.Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _static(dim: Any) -> int | None:
    try:
        return int(dim)
    except Exception:  # a symbolic size
        return None


def _reaches_input(node: Any, wanted: Callable[[torch.fx.Node], bool], skip: set = frozenset()) -> bool:
    """True when a graph input that ``wanted`` accepts is upstream of ``node`` (not looking through ``skip`` ops)."""
    if not isinstance(node, torch.fx.Node):
        return False
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or _fn(n, skip):
            continue
        seen.add(n)
        if n.op == "placeholder" and wanted(n):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _is_constant(node: Any) -> bool:
    """True for parameters, buffers and anything computed only from them and from input *shapes*."""
    return not _reaches_input(node, lambda n: True, _SHAPE_OPS)


@dataclass
class _Chain:
    """The eager pattern found behind one softmax."""

    scores: torch.fx.Node  # q @ k^T
    softmax: torch.fx.Node
    out: torch.fx.Node  # probs @ v
    scale: float
    softcap: float | None
    sinks: bool


def _score_chain(softmax: torch.fx.Node) -> _Chain | None:
    """Walk from a softmax back to an activation x activation product, and forward to probs @ v."""
    ops: list[torch.fx.Node] = []
    cur = softmax.args[0]
    while _fn(cur, _SCORE_OPS):
        ops.append(cur)
        data = [a for a in cur.args if isinstance(a, torch.fx.Node) and not _is_constant(a)]
        if cur.target == aten.cat.default:
            data = [a for a in cur.args[0] if not _is_constant(a)]
        if cur.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            data = [cur.args[0]]
        if cur.target == aten.where.self:
            data = [a for a in cur.args[1:] if isinstance(a, torch.fx.Node) and len(_shape(a)) >= 3]
        if len(data) != 1:  # two activations meet here (or none): not a plain score chain
            data = [a for a in data if len(_shape(a)) == len(_shape(cur))][:1]
            if not data:
                return None
        cur = data[0]
    if not _fn(cur, _MATMUL) or _is_constant(cur.args[0]) or _is_constant(cur.args[1]):
        return None
    scores = cur
    # forward: softmax -> (casts, dropout, sink slice) -> matmul(probs, v)
    probs, out = softmax, None
    for _ in range(6):
        users = [u for u in probs.users if u.target is not aten._assert_tensor_metadata.default]
        if len(users) != 1:
            break
        (user,) = users
        if _fn(user, _MATMUL) and user.args[0] is probs and not _is_constant(user.args[1]):
            out = user
            break
        if not _fn(user, _PROB_OPS):
            break
        probs = user
    if out is None:
        return None
    scale, softcap, sinks = 1.0, None, False
    tanh_at = next((i for i, n in enumerate(ops) if n.target == aten.tanh.default), None)
    for i, n in enumerate(ops):
        if n.target == aten.cat.default:
            sinks = sinks or any(_is_constant(a) or a.op == "get_attr" for a in n.args[0] if isinstance(a, torch.fx.Node))
            continue
        if n.target not in (aten.mul.Tensor, aten.div.Tensor):
            continue
        const = next((a for a in n.args if isinstance(a, (int, float))), None)
        if const is None:
            continue
        value = float(const) if n.target == aten.mul.Tensor else 1.0 / float(const)
        if tanh_at is not None and i < tanh_at:  # applied after tanh: the cap itself
            softcap = float(const)
        elif tanh_at is not None and i == tanh_at + 1:  # the division by the cap feeding tanh
            continue
        else:
            scale *= value
    return _Chain(scores, softmax, out, scale, softcap, sinks)


def _strip(node: Any, ops: set) -> Any:
    while _fn(node, ops):
        node = node.args[0]
    return node


def _before_repeat(node: torch.fx.Node) -> torch.fx.Node:
    """The k/v tensor before a GQA repeat (unsqueeze -> expand -> reshape), else the node itself."""
    reshape_ops = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.clone.default,
                   aten.contiguous.default}
    cur = _strip(node, reshape_ops)
    if _fn(cur, {aten.expand.default}):
        cur = _strip(cur.args[0], {aten.clone.default, aten.contiguous.default})
        if _fn(cur, {aten.unsqueeze.default}):
            return _strip(cur.args[0], {aten.slice.Tensor})
    if _fn(cur, {aten.repeat_interleave.self_int}):
        return cur.args[0]
    return node


def _query_source(q: torch.fx.Node) -> tuple[torch.fx.Node | None, str | None, bool]:
    """(layer input, query weight name, rotary?) by walking up from q to its projection."""
    seen, frontier, rotary = set(), [q], False
    ops_seen: set = set()
    linear = None
    while frontier and len(seen) < 64:
        n = frontier.pop(0)
        if n in seen or not isinstance(n, torch.fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target == aten.linear.default:
            linear = n
            break
        ops_seen.add(n.target)
        frontier.extend(a for a in n.all_input_nodes if not _is_constant(a))
    rotary = aten.neg.default in ops_seen and aten.cat.default in ops_seen
    rotary = rotary or any("complex" in str(t) for t in ops_seen)
    if linear is None:
        return None, None, rotary
    weight = linear.args[1]
    weight_name = weight.target if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else None
    hidden = linear.args[0]
    qs, hs = _shape(q), _shape(hidden)
    layout_ok = len(qs) == 4 and len(hs) == 3 and hs[0] == qs[0] and hs[1] == qs[2]
    return (hidden if layout_ok else None), weight_name, rotary


def _heads(node: torch.fx.Node) -> int:
    shape = _shape(node)
    return (_static(shape[1]) or 0) if len(shape) == 4 else 1


@register_pass
class DetectAttention(Pass):
    """Find every attention site (sdpa and eager softmax(q k^T) v) and publish it as sites.attention."""

    name = "detect-attention"
    provides = frozenset({SITES_KEY})

    @dataclass
    class Config:
        probe_seq_len: int = option(128, "sequence length of the probe inputs whose masks are classified "
                                         "(token models with a dynamic sequence axis; windows wider than this read as causal)")

        def validate(self) -> None:
            if self.probe_seq_len < 2:
                raise ValueError(f"probe_seq_len must be >= 2, got {self.probe_seq_len}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        sites = detect_attention(program, self.config.probe_seq_len)
        annotations = {**program.annotations, SITES_KEY: sites}
        metrics = {"sites": len(sites), "attention_sites": [s.as_dict() for s in sites]}
        return PassResult(program.replace(annotations=annotations), False, metrics)


def _probe_inputs(program: Program, seq_len: int) -> tuple:
    if program.source.task in ("causal-lm", "encoder") and program.source.vocab_size and program.dynamic_dims:
        limit = program.source.max_seq_len or seq_len
        batch = max(2, int(program.example_inputs[0].shape[0]))
        return resized_inputs(program, {"batch": batch, "seq": min(seq_len, limit)}, seed=7)
    return program.example_inputs


def _depends_on_mask_input(node: Any) -> bool:
    return _reaches_input(node, lambda n: "mask" in n.name)


def detect_attention(program: Program, probe_seq_len: int = 128) -> list[AttentionSite]:
    """Every attention site of ``program`` in graph order."""
    graph = program.module.graph
    found: list[tuple[str, torch.fx.Node, dict[str, Any]]] = []
    for node in graph.nodes:
        if _fn(node, _SDPA):
            found.append(("sdpa", node, {}))
        elif _fn(node, _SOFTMAX):
            chain = _score_chain(node)
            if chain is not None:
                found.append(("eager", node, {"chain": chain}))
    if not found:
        return []
    # masks are read from values on probe inputs: the sdpa mask argument, or the eager softmax's input
    probe: dict[str, torch.fx.Node] = {}
    for kind, node, extra in found:
        if kind == "sdpa":
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            if isinstance(mask, torch.fx.Node):
                probe[node.name] = mask
        else:
            probe[node.name] = node.args[0]
    values = node_values(program.module, _probe_inputs(program, probe_seq_len), {n.name for n in probe.values()})
    return [_site(kind, node, extra, probe.get(node.name), values) for kind, node, extra in found]


def _sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _site(kind: str, node: torch.fx.Node, extra: dict, mask_node: Any, values: dict) -> AttentionSite:
    if kind == "sdpa":
        a = _sdpa_args(node)
        q, k, v, out = a["query"], a["key"], a["value"], node
        head_dim = _static(_shape(q)[-1]) or 1
        scale = float(a["scale"]) if a.get("scale") is not None else 1.0 / math.sqrt(head_dim)
        if a.get("is_causal"):
            info = MaskInfo("causal", True, None)
        elif mask_node is None:
            info = MaskInfo("none", False, None)
        else:
            info = classify(allowed_pattern(values[mask_node.name]))
        softcap, sinks = None, False
    else:
        chain: _Chain = extra["chain"]
        q, k_t, v, out = chain.scores.args[0], chain.scores.args[1], chain.out.args[1], chain.out
        k = k_t.args[0] if _fn(k_t, {aten.transpose.int}) else k_t
        head_dim = _static(_shape(q)[-1]) or 1
        scale, softcap, sinks = chain.scale, chain.softcap, chain.sinks
        logits = values[mask_node.name]
        if sinks:  # the sink column is not a key
            logits = logits[..., : _shape(chain.scores)[-1] if _static(_shape(chain.scores)[-1]) else logits.shape[-1] - 1]
        info = classify(allowed_pattern(logits))
    if _depends_on_mask_input(mask_node) and "padding" not in info.kind:
        info = MaskInfo("padding" if info.kind == "none" else info.kind + "+padding", info.causal, info.window)
    k_heads, v_heads = _before_repeat(k), _before_repeat(v)
    hidden, q_weight, rotary = _query_source(q)
    return AttentionSite(
        module=module_path(out), kind=kind, q=q.name, k=k.name, v=v.name, out=out.name,
        k_heads=k_heads.name, v_heads=v_heads.name, hidden=hidden.name if hidden is not None else None,
        q_weight=q_weight, num_heads=_heads(q), num_kv_heads=_heads(k_heads), head_dim=head_dim,
        causal=info.causal, mask=info.kind, window=info.window, rotary=rotary, scale=scale,
        sinks=sinks, softcap=softcap,
    )
