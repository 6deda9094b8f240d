"""The decode form of a rewritten Program: its fx graph turned into a step graph with explicit state in and out.

    (input_ids [batch, seq], past state...) -> (logits [batch, seq, vocab], present state...)

Built from the Program *after its passes* (never from the source model), so every rewrite deploys. Each attention
site of the final graph gets its state, in graph order (site index ``i``):

* a plain softmax site (found by ``detect_attention`` on the final graph): its KV cache
  ``past_key_i`` / ``past_value_i``, in one of two layouts (memc.codegen.attention picks by the onnxruntime
  version):

  - ``preallocated``: buffers [batch, kv_heads, capacity, head_dim] plus one ``past_length`` input (int64 scalar,
    tokens already in the buffers). The site becomes ``memc::cached_attention`` (GroupQueryAttention): the new
    k / v go to positions ``past_length ..``, the query attends to the first ``past_length + seq`` positions, and
    the presents have the buffers' shape (the caller keeps ``capacity >= past_length + seq``; bound to the same
    memory, onnxruntime updates them in place).
  - ``concat``: caches [batch, kv_heads, past, head_dim]; softmax attention of the rotated q over
    ``concat(past, k_heads)`` / ``concat(past, v_heads)`` (GQA repeat redone after the concat) with a causal mask
    offset by the past length; the concatenations are the presents.
* a MemoryCachingAttention call (the memory-caching pass): the layer's fixed-layout MemoryCachingState
  ``past_mc_<field>_i`` (mc_state.py), updated by the layer's recurrent ``step``; a SelectiveMemoryAttention call
  (its ``select`` variant) likewise, with its SelectiveState ``past_sel_<field>_i`` (selective_state.py). Both
  are state kind ``mc`` (fixed size; the site records ``mc`` or ``select``). Only capped layers
  (``max_segments > 0``, ``max_tokens > 0``) have a fixed-size state; an unbounded one is refused here, before
  anything is lowered. ``step`` takes one token, so a graph with any memory-caching site has a static ``seq`` of 1
  and the engine feeds a prompt token by token.

Positions: the captured graph derives position ids (and from them RoPE cos/sin, or learned position embeddings)
from ``arange(seq)`` where ``seq`` is ``input_ids.shape[1]``. Every such ``arange`` gets the past length added
(``past_length``, the KV past axis, or a memory-caching layer's token counter ``t``), so positions are ``past + arange(seq)`` in
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

from memc.codegen.attention import _attend, choose, drop_dead_masks, gqa_fits, lengths
from memc.errors import UnsupportedError
from memc.nn.mc_state import MemoryCachingState
from memc.nn.memory_caching import MemoryCachingAttention
from memc.nn.selective import SelectiveMemoryAttention
from memc.nn.selective_state import SelectiveState
from memc.passes.attention.detect import detect_attention
from memc.passes.attention.sites import AttentionSite
from memc.program import DimSpec, Program, module_path

aten = torch.ops.aten
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
# Example sizes for torch.export: distinct, and >= 2 on every dynamic axis (torch.export specialises 0 and 1).
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_CAPACITY = 2, 5, 3, 11
LENGTH_INPUT = "past_length"  # preallocated KV layout: tokens already held by the buffers (int64 scalar)


@dataclass(frozen=True)
class StateTensor:
    """One state input of a decode graph (its output is the same name with ``present_`` for ``past_``).

    ``shape`` holds ints and the symbolic dims ``"batch"`` and ``"past"`` (a growing KV cache) or ``"capacity"`` (a
    preallocated one); ``kind`` is ``kv`` or ``mc`` (a fixed-size memory-caching state, select variant included);
    ``site`` the owning attention module path. This is the layout report.json and the graph's metadata record, and
    what memc.runtime.DecodeEngine reads.
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
    kv_layout: str | None = None  # preallocated | concat, None without KV sites
    rotary_positions: int | None = None  # set by lowering when attention applies the rotary from a table of this length

    @property
    def length_input(self) -> str | None:
        return LENGTH_INPUT if self.kv_layout == "preallocated" else None

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *([self.length_input] if self.length_input else []), *(s.name for s in self.state)]

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
        tensors = [torch.tensor(past, dtype=torch.int64)] if self.length_input else []
        sizes = {"batch": batch, "past": past, "capacity": EXAMPLE_CAPACITY}
        for s in self.state:
            shape = [sizes[d] if isinstance(d, str) else int(d) for d in s.shape]
            dtype = getattr(torch, s.dtype)
            if dtype.is_floating_point:
                tensors.append(torch.randn(shape, generator=gen).to(dtype))
            else:  # the memory-caching token counter: a plausible count past the window
                tensors.append(torch.full(shape, past, dtype=dtype))
        return (ids, *tensors)

    def dims(self) -> dict[str, dict[int, DimSpec]]:
        batch = DimSpec("batch", 1, None)
        seq, past = DimSpec("seq", 1, self.max_seq_len), DimSpec("past", 0, self.max_seq_len)
        specs = {"batch": batch, "past": past, "capacity": DimSpec("capacity", 1, None)}
        out = {"input_ids": {0: batch, 1: seq} if self.seq_dynamic else {0: batch}}
        if self.length_input:
            out[self.length_input] = {}
        for s in self.state:
            out[s.name] = {a: specs[d] for a, d in enumerate(s.shape) if isinstance(d, str)}
        return out

    def dynamic_shapes(self) -> dict[str, Any]:
        made: dict[str, Any] = {}
        dims = self.dims()

        def axes(name: str) -> dict[int, Any] | None:
            return {a: made.setdefault(s.name, s.to_torch()) for a, s in dims[name].items()} or None

        state = [axes(s.name) for s in self.state]
        return {"input_ids": axes("input_ids"), "state": tuple([None] * bool(self.length_input) + state)}


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


RecurrentLayer = MemoryCachingAttention | SelectiveMemoryAttention
# per recurrent layer type: its state class, the state names' prefix (past_<prefix>_<field>_i), the site kind
RECURRENT: dict[type, tuple[type, str, str]] = {
    MemoryCachingAttention: (MemoryCachingState, "mc", "mc"),
    SelectiveMemoryAttention: (SelectiveState, "sel", "select"),
}
# per recurrent layer type: the option that caps its state (0 = unbounded), what it caps, how the layer is named
_CAPS: dict[type, tuple[str, str, str]] = {
    MemoryCachingAttention: ("max_segments", "cached segments", "MemoryCachingAttention"),
    SelectiveMemoryAttention: ("max_tokens", "kept tokens", "SelectiveMemoryAttention (memory-caching variant select)"),
}


class RecurrentStep(nn.Module):
    """A memory-caching (or select) layer call in step form: ``(q, k, v, x, *state) -> (y, *new_state)``."""

    def __init__(self, layer: RecurrentLayer):
        super().__init__()
        self.layer = layer
        self.state_cls = RECURRENT[type(layer)][0]

    def forward(self, q, k, v, x, *state):
        y, new = self.layer.step(q, k, v, x, self.state_cls.from_tensors(state))
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


def check_mc_layer(module: str, layer: RecurrentLayer) -> None:
    option, capped, name = _CAPS[type(layer)]
    if getattr(layer.cfg, option) <= 0:
        raise UnsupportedError(
            f"{_site_label(module)}: its {name} is unbounded ({option} = 0), so its decode state "
            "grows with the context and has no fixed-size decode graph",
            hint=f"set the memory-caching pass option {option} > 0 (a cap on {capped}), or "
                 "target.decode_graph = false",
        )


def mc_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, RecurrentLayer]]:
    """The call_module nodes of memory-caching layers (select variant included), in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) in RECURRENT:
                out.append((node, mod))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_decodable(program: Program) -> tuple[list[AttentionSite], list[tuple[fx.Node, RecurrentLayer]]]:
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


def kv_layout(sites: list[AttentionSite], by_name: dict[str, fx.Node], attention: str = "auto") -> str | None:
    """``preallocated`` when the lowering for this onnxruntime is GroupQueryAttention and every KV site fits it,
    else ``concat``; None without KV sites."""
    if not sites:
        return None
    if choose(attention=attention).kv_cache != "preallocated":
        return "concat"
    for site in sites:
        q, v = by_name[site.q].meta.get("val"), by_name[site.v_heads].meta.get("val")
        if q is None or v is None or not gqa_fits(site.num_heads, site.num_kv_heads, int(q.shape[-1]),
                                                  int(v.shape[-1]), q.dtype):
            return "concat"
    return "preallocated"


def decode_graph(program: Program, attention: str = "auto") -> DecodeGraph:
    """The Program's graph in step form (see the module docstring); refuses what has no decode form.

    ``attention``: auto (by the onnxruntime version, memc.codegen.attention) | gqa | standard."""
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
    layout = kv_layout(kv_sites, by_name, attention)

    ids = next(n for n in graph.nodes if n.op == "placeholder")
    last = ids
    length: fx.Node | None = None
    if layout == "preallocated":  # GroupQueryAttention's length inputs, computed once for every layer
        with graph.inserting_after(ids):
            length = last = graph.placeholder(LENGTH_INPUT)
        first_site = next(n for n in graph.nodes if n in kv_by_out or n in mc_nodes)
        with graph.inserting_before(first_site):
            lens = graph.call_function(lengths, (graph.call_function(aten.sym_size.int, (ids, 0)),
                                                 graph.call_function(aten.sym_size.int, (ids, 1)), length))
            seqlens_k = graph.call_function(operator.getitem, (lens, 0))
            total = graph.call_function(operator.getitem, (lens, 1))
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
            axis = "capacity" if length is not None else "past"
            for name, val in zip(names, (kval, vval)):
                state.append(StateTensor(name, ("batch", int(val.shape[1]), axis, int(val.shape[3])),
                                         _dtype_name(val.dtype), "kv", site.module))
            with graph.inserting_before(node):
                if length is not None:
                    call = graph.call_function(torch.ops.memc.cached_attention.default,
                                               (by_name[site.q], k_heads, v_heads, pk, pv, seqlens_k, total,
                                                float(site.scale)))
                    att, k_all, v_all = (graph.call_function(operator.getitem, (call, j)) for j in range(3))
                else:
                    k_all = graph.call_function(aten.cat.default, ([pk, k_heads], 2))
                    v_all = graph.call_function(aten.cat.default, ([pv, v_heads], 2))
                    att = graph.call_function(_attend, (by_name[site.q], k_all, v_all, float(site.scale)))
            first_kv = first_kv or pk
            presents += [k_all, v_all]
            sites.append({"module": site.module, "kind": "kv", "state": list(names)})
        else:
            layer = mc_nodes[node]
            module = str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else module_path(node)
            init = layer.init_state(1, dtype=node.args[0].meta["val"].dtype)
            state_cls, prefix, site_kind = RECURRENT[type(layer)]
            placeholders = []
            for fname, t in zip(state_cls.names(), init.tensors()):
                name = f"past_{prefix}_{fname}_{index}"
                with graph.inserting_after(last):
                    last = graph.placeholder(name)
                placeholders.append(last)
                shape = ("batch", *t.shape[1:]) if t.dim() else ()
                state.append(StateTensor(name, tuple(int(d) if not isinstance(d, str) else d for d in shape),
                                         _dtype_name(t.dtype), "mc", module))
            target = f"memc_decode_step_{index}"
            gm.add_submodule(target, RecurrentStep(layer))
            with graph.inserting_before(node):
                call = graph.call_module(target, (*node.args, *placeholders))
                y = graph.call_function(operator.getitem, (call, 0))
                new = [graph.call_function(operator.getitem, (call, 1 + j)) for j in range(len(placeholders))]
            att = y
            first_t = first_t or placeholders[0]  # t, the tokens seen so far
            presents += new
            sites.append({"module": module, "kind": site_kind, "state": [p.name for p in placeholders]})
        node.replace_all_uses_with(att)
        graph.erase_node(node)
    if length is not None:
        offset = length
    elif first_kv is not None:
        with graph.inserting_after(last):
            offset = graph.call_function(aten.sym_size.int, (first_kv, 2))
    else:
        offset = first_t
    _offset_positions(graph, ids, offset)
    graph.output((logits, *presents))
    drop_dead_masks(graph)
    gm.recompile()
    return DecodeGraph(gm, state, not mc, int(program.source.vocab_size), program.source.max_seq_len,
                       program.source.path, sites, layout)


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
