"""moe-calibrate: one pass over calibration text collecting, per MoE layer and expert, the statistics the pruning
criteria rank by, plus the per-token top-k traces (annotation ``moe.calibration``).

Per expert e over the calibration tokens t (g = the gate weight the graph multiplies expert e's output by,
f_e = that output, p = the router's score for e, R_e = the tokens routed to e):
  count  |R_e|                                    (frequency)
  soft   sum_{t in R_e} g_te                       (soft frequency)
  tcess  1/T sum_t p_te [e in top-k(t)]            (PreMoe's task-conditioned expected selection score)
  ean    sum_{t in R_e} ||f_e(x_t)||               (expert activation norm)
  reap   1/|R_e| sum_{t in R_e} g_te ||f_e(x_t)||  (REAP; undefined, reported as never routed, when R_e is empty)
Values are read from the graph itself (an instrumented copy returns the router logits, top-k indices, gate weights
and expert outputs), so every routing variant memc detects is measured the way it runs; fused experts run in the
grouped form (``memc.passes.moe.grouped``: the same values up to float rounding, several times faster).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from memc.errors import ConfigError, PassError
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.moe.detect import SITES_KEY
from memc.passes.moe.graph import PASSTHROUGH, aten, source_attr
from memc.passes.moe.grouped import grouped_form
from memc.passes.moe.sites import MoESite
from memc.program import Program, module_path
from memc.schema import option

CALIBRATION_KEY = "moe.calibration"
STATS = ("count", "soft", "tcess", "ean", "reap")


@dataclass
class LayerStats:
    """One MoE layer's statistics (float64 [E] tensors) and its top-k trace ([tokens, k] int16, window-major)."""

    path: str
    num_experts: int
    top_k: int
    count: torch.Tensor
    soft: torch.Tensor
    tcess: torch.Tensor
    ean: torch.Tensor
    reap: torch.Tensor  # NaN where never routed
    trace: torch.Tensor
    gates: torch.Tensor  # [tokens, k] float32, the gate weights of the trace

    @property
    def never_routed(self) -> list[int]:
        return [int(e) for e in torch.nonzero(self.count == 0).flatten()]


@dataclass
class MoECalibration:
    text: str
    inputs: list[tuple[torch.Tensor, ...]]  # the forward inputs routed (kept for router re-fitting)
    layers: list[LayerStats]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.layers[0].trace.shape[0]) if self.layers else 0

    def summary(self) -> dict[str, Any]:
        return {
            "text": self.text, "batches": len(self.inputs), "tokens": self.tokens, "seconds": round(self.seconds, 3),
            "never_routed": {l.path: l.never_routed for l in self.layers if l.never_routed},
            "load": {l.path: [int(c) for c in l.count] for l in self.layers},
        }


# --- calibration text ---------------------------------------------------------------------------------------------
def calibration_text(spec: str, where: str) -> bytes:
    """``trainsplit:code`` / ``trainsplit:prose`` or a UTF-8 file; held-out text is refused, never read."""
    from memc.eval.text import load_train_text

    return load_train_text(spec, where)


def token_windows(program: Program, data: bytes, windows: int, context: int, where: str) -> torch.Tensor:
    """``windows`` evenly spaced windows of ``context`` tokens (fewer, shorter ones if the text is short)."""
    from memc.calibration import _tokenize

    tokens = _tokenize(data.decode("utf-8"), program, "auto")
    limit = program.source.max_seq_len or context
    length = min(context, limit, len(tokens))
    if length < 2:
        raise ConfigError(f"{where}: the calibration text has {len(tokens)} token(s); at least 2 are needed")
    n = max(1, min(windows, len(tokens) // length))
    stride = (len(tokens) - length) // max(n - 1, 1)
    rows = [tokens[i * stride : i * stride + length] for i in range(n)]
    return torch.tensor(rows, dtype=torch.int64)


# --- an instrumented copy of the graph ----------------------------------------------------------------------------
@dataclass
class Probe:
    """Graph nodes read for one site: logits [T, E], indices [T, k], and per routed (token, expert) pair the gate
    weight and the expert output (fused: [T*k] / [T*k, H] aligned with the flattened indices; modulelist: per
    expert e a [T, 1] gate and a [T, H] output)."""

    logits: Node
    indices: Node
    gates: list[Node]
    outputs: list[Node]


def within(node: Node, prefix: str) -> bool:
    path = module_path(node)
    return path == prefix or path.startswith(prefix + ".")


def _from_outside(arg: object, prefix: str) -> bool:
    """``arg`` comes (through passthrough ops) from a node outside module ``prefix``."""
    while isinstance(arg, Node) and arg.op == "call_function" and within(arg, prefix) and arg.target in PASSTHROUGH:
        arg = arg.args[0]
    return isinstance(arg, Node) and arg.op == "call_function" and not within(arg, prefix)


def _weighting_mul(nodes: list[Node], prefix: str) -> Node | None:
    """The mul that scales an expert output by its gate: one operand from inside the experts, one from the router."""
    for n in nodes:
        if n.target is aten.mul.Tensor and all(isinstance(a, Node) for a in n.args[:2]):
            outside = [_from_outside(a, prefix) for a in n.args[:2]]
            if outside.count(True) == 1:
                return n
    return None


def probe(gm: GraphModule, site: MoESite) -> Probe:
    by_name = {n.name: n for n in gm.graph.nodes}
    logits, indices = by_name[site.router_node], by_name[site.indices_node]
    gates: list[Node] = []
    outputs: list[Node] = []
    if site.experts_form == "fused":
        gather = next(n for n in gm.graph.nodes if n.target is aten.index.Tensor and source_attr(n.args[0]) in site.expert_params)
        prefix = module_path(gather)
        mul = _weighting_mul([n for n in gm.graph.nodes if within(n, prefix)], prefix)
        if mul is None:
            raise PassError(f"moe-calibrate: cannot find where {site.path}'s expert outputs are weighted by their gates")
        a, b = mul.args[:2]
        gate, out = (a, b) if _from_outside(a, prefix) else (b, a)
        gates, outputs = [gate], [out]
    else:
        for prefix in site.expert_modules:
            inside = [n for n in gm.graph.nodes if within(n, prefix)]
            last = [n for n in inside if any(not within(u, prefix) for u in n.users)]
            if len(last) != 1:
                raise PassError(f"moe-calibrate: expert {prefix} has {len(last)} outputs; expected one")
            mul = next((u for u in last[0].users if u.target is aten.mul.Tensor), None)
            if mul is None:
                raise PassError(f"moe-calibrate: expert {prefix}'s output is not multiplied by a gate")
            gates.append(mul.args[0] if mul.args[1] is last[0] else mul.args[1])
            outputs.append(last[0])
    return Probe(logits, indices, gates, outputs)


def instrumented(gm: GraphModule, probes: list[Probe]) -> GraphModule:
    """A GraphModule sharing ``gm``'s weights whose forward returns the probed values (positional inputs)."""
    graph = Graph()
    env: dict[Node, Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        env[n] = graph.node_copy(n, lambda x: env[x])
    wanted = []
    for p in probes:
        wanted.append((env[p.logits], env[p.indices], [env[g] for g in p.gates], [env[o] for o in p.outputs]))
    graph.output(wanted)
    out = GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


# --- the pass -----------------------------------------------------------------------------------------------------
def _scores(site: MoESite, logits: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The router's score of each selected expert before renormalisation (for TCESS), [T, k]."""
    if site.score == "softmax-topk":
        return logits.float().softmax(-1).gather(1, idx)
    if site.score == "sigmoid":
        return logits.float().sigmoid().gather(1, idx)
    return gates  # topk-softmax: the softmax over the k is the score


def window_inputs(program: Program, windows: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Token windows as forward inputs (with an all-ones attention mask where the graph takes one)."""
    out = []
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch]
        out.append((ids, torch.ones_like(ids)) if "attention_mask" in program.input_names else (ids,))
    return out


def collect(program: Program, sites: list[MoESite], inputs: list[tuple[torch.Tensor, ...]]) -> list[LayerStats]:
    # the grouped-experts form: the exported gathered-weight bmm's values, several times faster
    gm, _ = grouped_form(instrumented(program.module, [probe(program.module, s) for s in sites]))
    acc = [{k: torch.zeros(s.num_experts, dtype=torch.float64) for k in ("count", "soft", "tcess", "ean", "g_norm")}
           for s in sites]
    traces: list[list[torch.Tensor]] = [[] for _ in sites]
    gate_traces: list[list[torch.Tensor]] = [[] for _ in sites]
    with torch.no_grad():
        for batch_inputs in inputs:
            outs = gm(*batch_inputs)
            for s, a, tr, gt, (logits, idx, gate_nodes, expert_outs) in zip(sites, acc, traces, gate_traces, outs):
                logits = logits.reshape(-1, logits.shape[-1])
                idx = idx.reshape(-1, s.top_k).long()
                T = idx.shape[0]
                onehot = torch.zeros(T, s.num_experts, dtype=torch.float64).scatter_(1, idx, 1.0)
                if s.experts_form == "fused":
                    g = gate_nodes[0].reshape(T, s.top_k).double()
                    norms = expert_outs[0].reshape(T, s.top_k, -1).double().norm(dim=-1)
                    flat = idx.flatten()
                    a["soft"].index_add_(0, flat, g.flatten())
                    a["ean"].index_add_(0, flat, norms.flatten())
                    a["g_norm"].index_add_(0, flat, (g * norms).flatten())
                else:
                    g = torch.stack([x.reshape(T) for x in gate_nodes], 1).double()  # [T, E], 0 where not routed
                    norms = torch.stack([o.reshape(T, -1).double().norm(dim=-1) for o in expert_outs], 1)
                    a["soft"] += (g * onehot).sum(0)
                    a["ean"] += (norms * onehot).sum(0)
                    a["g_norm"] += (g * norms * onehot).sum(0)
                    g = g.gather(1, idx)
                a["count"] += onehot.sum(0)
                score = _scores(s, logits, idx, g.float())
                a["tcess"].index_add_(0, idx.flatten(), score.double().flatten())
                tr.append(idx.to(torch.int16))
                gt.append(g.float())
    out = []
    for s, a, tr, gt in zip(sites, acc, traces, gate_traces):
        count = a["count"]
        reap = torch.where(count > 0, a["g_norm"] / count.clamp(min=1), torch.full_like(count, float("nan")))
        tokens = sum(t.shape[0] for t in tr)
        out.append(LayerStats(s.path, s.num_experts, s.top_k, count, a["soft"], a["tcess"] / tokens, a["ean"], reap,
                              torch.cat(tr), torch.cat(gt)))
    return out


@dataclass
class CalibrateOptions:
    text: str = option(
        "trainsplit:code",
        "trainsplit:code | trainsplit:prose | a UTF-8 file (never held-out text) | samples (the [calibration] samples)",
    )
    windows: int = option(32, "calibration windows, evenly spaced over the text")
    context: int = option(1024, "tokens per window (capped by the model's maximum and the text's length)")
    batch: int = option(1, "windows per forward")

    def validate(self) -> None:
        if self.windows < 1 or self.context < 2 or self.batch < 1:
            raise ValueError("windows and batch must be >= 1 and context >= 2")


@register_pass
class MoECalibrate(Pass):
    """Route calibration text through every MoE layer; record frequency, soft frequency, TCESS, EAN, REAP, traces."""

    name = "moe-calibrate"
    Config = CalibrateOptions
    requires = frozenset({SITES_KEY})
    provides = frozenset({CALIBRATION_KEY})

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        sites: list[MoESite] = program.annotations[SITES_KEY]
        if not sites:
            raise PassError("moe-calibrate: the model has no MoE layer (detect-moe found none)")
        where = f"{self.name}.text"
        start = time.perf_counter()
        if cfg.text == "samples":
            inputs = list(ctx.calibration)
            if not inputs:
                raise ConfigError(f"{where}: 'samples' needs [calibration] samples, and there are none")
        elif program.source.task != "causal-lm":
            raise ConfigError(f"{where}: text calibration needs a token model (a Hugging Face causal LM); "
                              "use text = \"samples\" for other models")
        else:
            windows = token_windows(program, calibration_text(cfg.text, where), cfg.windows, cfg.context, where)
            inputs = window_inputs(program, windows, cfg.batch)
        layers = collect(program, sites, inputs)
        calib = MoECalibration(cfg.text, inputs, layers, time.perf_counter() - start)
        program.annotations[CALIBRATION_KEY] = calib
        return PassResult(program, False, calib.summary())
