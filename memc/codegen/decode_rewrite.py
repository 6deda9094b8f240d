"""The decode form of a rewritten Program: its fx graph turned into a step graph with explicit state in and out.

    (input_ids [batch, seq], past state...) -> (logits [batch, seq, vocab], present state...)

Built from the Program *after its passes* (never from the source model), so every rewrite deploys. Each attention
site of the final graph gets its state, in graph order (site index ``i``):

* a plain softmax site (found by ``detect_attention`` on the final graph): its KV cache
  ``past_key_i`` / ``past_value_i`` [batch, kv_heads, past, head_dim]. The site's output node is replaced by
  softmax attention of its rotated q over ``concat(past, k_heads)`` / ``concat(past, v_heads)`` (GQA repeat
  redone after the concat) with a causal mask offset by the past length; the concatenations are the presents.
* a MemoryCachingAttention call (the memory-caching pass): the layer's fixed-layout MemoryCachingState
  ``past_mc_<field>_i`` (mc_state.py), updated by the layer's recurrent ``step``. Only capped layers
  (``max_segments > 0``) have a fixed-size state; an unbounded one is refused here, before anything is lowered.
  ``step`` takes one token, so a graph with any memory-caching site has a static ``seq`` of 1 and the engine
  feeds a prompt token by token.

Positions: the captured graph derives position ids (and from them RoPE cos/sin, or learned position embeddings)
from ``arange(seq)`` where ``seq`` is ``input_ids.shape[1]``. Every such ``arange`` gets the past length added
(the KV past axis, or a memory-caching layer's token counter ``t``), so positions are ``past + arange(seq)`` in
both phases. This is a graph rewrite rather than a re-trace: the Program is an fx graph whose only input is
input_ids, and the rewrite keeps every pass's changes verbatim. Aranges over the sequence that feed the
original attention masks get offset too, harmlessly: those masks die with the attention they fed.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from memc.errors import UnsupportedError
from memc.nn.mc_state import FIELDS as MC_FIELDS
from memc.nn.mc_state import MemoryCachingState
from memc.nn.memory_caching import MemoryCachingAttention
from memc.passes.attention.detect import detect_attention
from memc.passes.attention.sites import AttentionSite
from memc.program import DimSpec, Program, module_path

aten = torch.ops.aten
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
# Example sizes for torch.export: distinct, and >= 2 on every dynamic axis (torch.export specialises 0 and 1).
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 5, 3


@dataclass(frozen=True)
class StateTensor:
    """One state input of a decode graph (its output is the same name with ``present_`` for ``past_``).

    ``shape`` holds ints and the symbolic dims ``"batch"`` and ``"past"`` (KV caches only); ``kind`` is ``kv`` or
    ``mc``; ``site`` the owning attention module path. This is the layout report.json and the graph's metadata
    record, and what memc.runtime.DecodeEngine reads.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy name: float32, float16, int64, ...
    kind: str
    site: str

    @property
    def output(self) -> str:
        return "present_" + self.name[len("past_"):]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class DecodeGraph:
    """The step-form GraphModule plus what torch.export and the exporter need."""

    module: fx.GraphModule
    state: list[StateTensor]
    seq_dynamic: bool  # False when a memory-caching site makes the graph single-token
    vocab_size: int
    max_seq_len: int | None
    source: str
    sites: list[dict[str, Any]] = field(default_factory=list)  # one {"module", "kind", "state"} per site

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *(s.name for s in self.state)]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(s.output for s in self.state)]

    @property
    def layers(self) -> int:
        return len(self.sites)

    def example_inputs(self, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, past: int = EXAMPLE_PAST) -> tuple:
        gen = torch.Generator().manual_seed(0)
        seq = seq if self.seq_dynamic else 1
        ids = torch.randint(0, self.vocab_size, (batch, seq), generator=gen)
        tensors = []
        for s in self.state:
            shape = [batch if d == "batch" else past if d == "past" else int(d) for d in s.shape]
            dtype = getattr(torch, s.dtype)
            if dtype.is_floating_point:
                tensors.append(torch.randn(shape, generator=gen).to(dtype))
            else:  # the memory-caching token counter: a plausible count past the window
                tensors.append(torch.full(shape, past, dtype=dtype))
        return (ids, *tensors)

    def dims(self) -> dict[str, dict[int, DimSpec]]:
        batch = DimSpec("batch", 1, None)
        seq, past = DimSpec("seq", 1, self.max_seq_len), DimSpec("past", 0, self.max_seq_len)
        out = {"input_ids": {0: batch, 1: seq} if self.seq_dynamic else {0: batch}}
        for s in self.state:
            out[s.name] = {a: batch if d == "batch" else past for a, d in enumerate(s.shape) if isinstance(d, str)}
        return out

    def dynamic_shapes(self) -> dict[str, Any]:
        made: dict[str, Any] = {}
        dims = self.dims()

        def axes(name: str) -> dict[int, Any] | None:
            return {a: made.setdefault(s.name, s.to_torch()) for a, s in dims[name].items()} or None

        return {"input_ids": axes("input_ids"), "state": tuple(axes(s.name) for s in self.state)}


class _Forward(nn.Module):
    """``(input_ids, *state)`` as torch.export wants it: one positional input plus a varargs tuple."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.gm(input_ids, *state))


def export_decode(graph: DecodeGraph) -> torch.export.ExportedProgram:
    return torch.export.export(
        _Forward(graph.module), graph.example_inputs(), dynamic_shapes=graph.dynamic_shapes(), strict=False
    )


def kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention of q [B, Hq, T, D] over k, v [B, Hkv, P + T, D]: query t sees keys <= P + t."""
    b, hkv, s, d = k.shape
    groups = q.shape[1] // hkv
    if groups > 1:  # the GQA repeat (query head h reads KV head h // groups), as transformers' repeat_kv
        k = k[:, :, None].expand(b, hkv, groups, s, d).reshape(b, hkv * groups, s, d)
        v = v[:, :, None].expand(b, hkv, groups, s, v.shape[-1]).reshape(b, hkv * groups, s, v.shape[-1])
    t = q.shape[2]
    rows = torch.arange(t, device=q.device).unsqueeze(1) + (s - t)
    mask = torch.arange(s, device=q.device).unsqueeze(0) <= rows
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class MemoryCachingStep(nn.Module):
    """A MemoryCachingAttention call in step form: ``(q, k, v, x, *state) -> (y, *new_state)``."""

    def __init__(self, layer: MemoryCachingAttention):
        super().__init__()
        self.layer = layer

    def forward(self, q, k, v, x, *state):
        y, new = self.layer.step(q, k, v, x, MemoryCachingState.from_tensors(state))
        return (y, *new.tensors())


def _site_label(module: str) -> str:
    return f"attention site {module or '(top level)'}"


def check_kv_site(site: AttentionSite) -> None:
    """Refuse (at check time) a plain site whose decode form this lowering does not reproduce."""
    where = _site_label(site.module)
    if not site.causal or site.mask != "causal":
        raise UnsupportedError(
            f"{where} has a {site.mask!r} mask: the decode graph extends plain causal attention with a KV cache only",
            hint="sliding-window, padding and bidirectional sites need their own state layout",
        )
    if site.sinks or site.softcap:
        raise UnsupportedError(f"{where} uses attention sinks or a logit soft-cap, which the decode graph does not "
                               "reproduce yet")


def check_mc_layer(module: str, layer: MemoryCachingAttention) -> None:
    if layer.cfg.max_segments <= 0:
        raise UnsupportedError(
            f"{_site_label(module)}: its MemoryCachingAttention is unbounded (max_segments = 0), so its decode state "
            "grows with the context and has no fixed-size decode graph",
            hint="set the memory-caching pass option max_segments > 0 (a cap on cached segments), or "
                 "target.decode_graph = false",
        )


def mc_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, MemoryCachingAttention]]:
    """The call_module nodes of memory-caching layers, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, MemoryCachingAttention):
                out.append((node, mod))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_decodable(program: Program) -> tuple[list[AttentionSite], list[tuple[fx.Node, MemoryCachingAttention]]]:
    """Everything that can refuse a decode graph, before anything is built: returns (KV sites, MC calls)."""
    if program.source.task != "causal-lm" or program.input_names[:1] != ["input_ids"] or not program.source.vocab_size:
        raise UnsupportedError(
            f"target.decode_graph = true needs a causal LM taking input_ids and returning logits; "
            f"{program.source.path} is a {program.source.kind} source ({program.source.task})",
            hint="set target.decode_graph = false for this model",
        )
    if len(program.input_names) != 1:
        raise UnsupportedError(f"the decode graph takes input_ids only; {program.source.path} also takes "
                               f"{program.input_names[1:]}", hint="set target.decode_graph = false for this model")
    kv = detect_attention(program)
    for site in kv:
        check_kv_site(site)
    mc = mc_calls(program.module)
    for node, layer in mc:
        check_mc_layer(str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else "", layer)
    if not kv and not mc:
        raise UnsupportedError(f"{program.source.path}: no attention site found, so there is no decode state to carry",
                               hint="set target.decode_graph = false for this model")
    return kv, mc


def decode_graph(program: Program) -> DecodeGraph:
    """The Program's graph in step form (see the module docstring); refuses what has no decode form."""
    kv_sites, mc = check_decodable(program)
    src = program.module
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    results, _ = graph.graph_copy(src.graph, val_map, return_output_node=True)
    logits = results[0] if isinstance(results, (tuple, list)) else results
    for node in list(graph.nodes):  # the capture's input-shape guards would pin seq / batch to the captured range
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    gm = fx.GraphModule(src, graph)
    graph = gm.graph
    by_name = {n.name: val_map[n] for n in src.graph.nodes if n in val_map}
    mc_nodes = {val_map[node]: layer for node, layer in mc}
    kv_by_out = {by_name[s.out]: s for s in kv_sites}

    ids = next(n for n in graph.nodes if n.op == "placeholder")
    last = ids
    state: list[StateTensor] = []
    sites: list[dict[str, Any]] = []
    presents: list[fx.Node] = []
    first_kv: fx.Node | None = None
    first_t: fx.Node | None = None
    ordered = [n for n in graph.nodes if n in kv_by_out or n in mc_nodes]
    for index, node in enumerate(ordered):
        if node in kv_by_out:
            site = kv_by_out[node]
            k_heads, v_heads = by_name[site.k_heads], by_name[site.v_heads]
            kval, vval = k_heads.meta["val"], v_heads.meta["val"]
            names = (f"past_key_{index}", f"past_value_{index}")
            with graph.inserting_after(last):
                pk = graph.placeholder(names[0])
            with graph.inserting_after(pk):
                pv = graph.placeholder(names[1])
            last = pv
            for name, val in zip(names, (kval, vval)):
                state.append(StateTensor(name, ("batch", int(val.shape[1]), "past", int(val.shape[3])),
                                         _dtype_name(val.dtype), "kv", site.module))
            with graph.inserting_before(node):
                k_all = graph.call_function(aten.cat.default, ([pk, k_heads], 2))
                v_all = graph.call_function(aten.cat.default, ([pv, v_heads], 2))
                att = graph.call_function(kv_attention, (by_name[site.q], k_all, v_all, float(site.scale)))
            first_kv = first_kv or pk
            presents += [k_all, v_all]
            sites.append({"module": site.module, "kind": "kv", "state": list(names)})
        else:
            layer = mc_nodes[node]
            module = str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else module_path(node)
            init = layer.init_state(1, dtype=node.args[0].meta["val"].dtype)
            placeholders = []
            for fname, t in zip(MC_FIELDS, init.tensors()):
                name = f"past_mc_{fname}_{index}"
                with graph.inserting_after(last):
                    last = graph.placeholder(name)
                placeholders.append(last)
                shape = ("batch", *t.shape[1:]) if t.dim() else ()
                state.append(StateTensor(name, tuple(int(d) if not isinstance(d, str) else d for d in shape),
                                         _dtype_name(t.dtype), "mc", module))
            target = f"memc_decode_step_{index}"
            gm.add_submodule(target, MemoryCachingStep(layer))
            with graph.inserting_before(node):
                call = graph.call_module(target, (*node.args, *placeholders))
                y = graph.call_function(operator.getitem, (call, 0))
                new = [graph.call_function(operator.getitem, (call, 1 + j)) for j in range(len(MC_FIELDS))]
            att = y
            first_t = first_t or placeholders[0]  # t, the tokens seen so far
            presents += new
            sites.append({"module": module, "kind": "mc", "state": [p.name for p in placeholders]})
        node.replace_all_uses_with(att)
        graph.erase_node(node)
    if first_kv is not None:
        with graph.inserting_after(last):
            offset = graph.call_function(aten.sym_size.int, (first_kv, 2))
    else:
        offset = first_t
    _offset_positions(graph, ids, offset)
    graph.output((logits, *presents))
    for node in list(graph.nodes):  # dtype/device asserts would keep the replaced attention's mask chain alive
        if node.op == "call_function" and node.target == aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return DecodeGraph(gm, state, not mc, int(program.source.vocab_size), program.source.max_seq_len,
                       program.source.path, sites)


def _offset_positions(graph: fx.Graph, ids: fx.Node, offset: fx.Node) -> None:
    """``arange(seq)`` (seq = input_ids.shape[1]) -> ``arange(seq) + past`` everywhere."""
    seq_sizes = {n for n in ids.users if n.op == "call_function" and n.target == aten.sym_size.int and n.args[1] == 1}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ARANGE:
            continue
        args = node.args
        counts = (len(args) == 1 and args[0] in seq_sizes) or (
            len(args) >= 2 and args[0] == 0 and args[1] in seq_sizes and (len(args) == 2 or args[2] == 1))
        if not counts:
            continue
        with graph.inserting_after(node):
            shifted = graph.call_function(aten.add.Tensor, (node, offset))
        node.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
