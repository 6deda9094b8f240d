"""The expert-cache form of a compiled MoE Program: segment graphs, experts graphs and a store of expert records.

A device that cannot hold every expert keeps C of each MoE layer's experts in fast *slots* and loads the others
on demand from a slow store. Which experts a token needs is known only after the router, so the model runs as

    segment 0 -> [host: ids -> slots, load misses] -> experts 0 -> segment 1 -> ... -> segment L -> logits

* ``segment_<s>.onnx``: the decode step graph of the Program after its passes (memc.codegen.decode_rewrite, KV
  caches in the ``concat`` layout) cut at every MoE site (memc.codegen.onnx_split). Segment ``s`` ends at site
  ``s``'s router and outputs its top-k ids and the rows the experts read; it holds no expert weights.
* ``experts_<i>.onnx``: site ``i``'s experts part (memc.codegen.expert_region) with the expert tensors as inputs of
  shape [slots, ...], gathered at the slot ids the host computed; it holds no weights at all.
* ``experts.bin``: one contiguous record per (layer, expert): the expert's rows of every expert tensor, in order;
  the engine memory-maps it and copies a record into a slot on a miss.
* ``expert_cache.json``: the layout (graphs, their inputs and outputs, the state, the store's records, slots).

Built from the Program after its passes (pruned experts included), never from the source model; memc.runtime's
ExpertCacheEngine runs it with numpy + onnxruntime.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx
from torch.export import Dim

from memc.atomic import atomic_file
from memc.codegen.decode_rewrite import DecodeGraph, decode_graph, export_decode
from memc.codegen.expert_region import ExpertRegion, check_form, experts_module, find_region
from memc.codegen.onnx import lower_exported, strip_exporter_metadata
from memc.codegen.onnx_split import split_segments
from memc.errors import ConfigError, UnsupportedError, first_line
from memc.passes.moe.detect import find_moe_sites
from memc.passes.moe.graph import get_attr_tensor
from memc.passes.moe.sites import MoESite
from memc.program import Program

DIR = "expert_cache"
MANIFEST = "expert_cache.json"
STORE = "experts.bin"
FORMAT = "memc.expert_cache/1"
_ALIGN = 64  # record alignment in the store


@dataclass
class CachePlan:
    """What the check found: the decode graph, its MoE sites and their regions (nothing written yet)."""

    graph: DecodeGraph
    sites: list[MoESite]
    regions: list[ExpertRegion]
    slots: int


def check_expert_cache(program: Program, slots: int, key: str = "target.expert_cache.slots") -> CachePlan:
    """Everything that can refuse the expert-cache form, before anything is lowered: a model without MoE layers,
    a slot count outside k..E, a site whose experts are not fused tensors gathered by id, a program with no decode
    form, a site that cannot be cut."""
    found = find_moe_sites(program.module)
    if not found:
        raise UnsupportedError(f"{key}: {program.source.path} has no MoE layer (no router + top-k over experts "
                               "found), so there are no experts to cache", hint="remove target.expert_cache")
    for s in found:
        if not s.top_k <= slots <= s.num_experts:
            raise ConfigError(f"{key}: {slots} slots for MoE site {s.path} (layer {s.layer}), which has "
                              f"{s.num_experts} experts and routes each token to {s.top_k}: slots must be in "
                              f"{s.top_k}..{s.num_experts}")
        check_form(s)
        for p in s.expert_params:
            dtype = get_attr_tensor(program.module, p).dtype
            if dtype not in (torch.float32, torch.float16):
                raise UnsupportedError(
                    f"{key}: MoE site {s.path} keeps its experts in {_dtype_name(dtype)}; the expert cache's host "
                    "copies them with numpy, which holds float32 and float16 only",
                    hint="compile with model.dtype = \"float32\" (or float16)")
    try:
        graph = decode_graph(program, "standard")
    except UnsupportedError as exc:
        raise UnsupportedError(f"{key}: the expert cache runs the decode form of the program, and {exc.args[0]}",
                               hint="remove target.expert_cache for this model") from None
    sites = find_moe_sites(graph.module)
    if [s.path for s in sites] != [s.path for s in found]:
        raise UnsupportedError(f"{key}: the decode form of {program.source.path} has MoE sites "
                               f"{[s.path for s in sites]}, the program {[s.path for s in found]}")
    regions = [find_region(graph.module, s) for s in sites]
    return CachePlan(graph, sites, regions, slots)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _structure(module: fx.GraphModule) -> str:
    """The graph's ops and wiring without node names: equal for the experts part of every layer of one
    architecture. A graph with weights of its own is unique."""
    if list(module.buffers()) or list(module.parameters()):
        return f"own weights {id(module)}"
    index = {n: i for i, n in enumerate(module.graph.nodes)}
    return repr([(n.op, str(n.target), fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}"))
                 for n in module.graph.nodes])


def experts_specs(gm: fx.GraphModule, region: ExpertRegion, names: list[str]) -> list[dict]:
    """The experts graph's inputs: name, role (rows | ids | slots | weight), shape, dtype."""
    site = region.site
    specs = []
    for i, node in enumerate(region.rows):
        val = node.meta["val"]
        if any(not isinstance(d, int) for d in val.shape[1:]):
            raise UnsupportedError(f"expert_cache: {region.label}: input {node.name} has a dynamic non-row axis")
        specs.append({"name": names[i], "role": "rows", "shape": ["rows", *map(int, val.shape[1:])],
                      "dtype": _dtype_name(val.dtype)})
    if "ids" in names:
        specs.append({"name": "ids", "role": "ids", "shape": ["rows", site.top_k], "dtype": "int64", "high": site.num_experts})
    specs.append({"name": "slots", "role": "slots", "shape": ["rows", site.top_k], "dtype": "int64"})
    for name, param in zip(names[-len(region.params):], region.params):
        w = get_attr_tensor(gm, param)
        specs.append({"name": name, "role": "weight", "param": param, "shape": ["slots", *map(int, w.shape[1:])],
                      "dtype": _dtype_name(w.dtype)})
    return specs


def lower_experts(module: fx.GraphModule, specs: list[dict], label: str, opset: int, optimize: bool) -> onnx.ModelProto:
    """The experts part as ONNX: inputs with a dynamic ``rows`` axis and slot buffers with a dynamic ``slots`` axis."""
    gen = torch.Generator().manual_seed(0)
    sizes = {"rows": 5, "slots": 3}
    examples, shapes, dims = [], [], {}
    axes = {"rows": Dim("rows", min=1), "slots": Dim("slots", min=1)}
    for spec in specs:
        shape = [sizes.get(d, d) for d in spec["shape"]]
        dtype = getattr(torch, spec["dtype"])
        if spec["role"] in ("ids", "slots"):
            examples.append(torch.randint(0, spec.get("high", sizes["slots"]), shape, generator=gen, dtype=dtype))
        else:
            examples.append(torch.randn(shape, generator=gen).to(dtype))
        shapes.append({0: axes[spec["shape"][0]]})
        dims[spec["name"]] = {0: spec["shape"][0]}
    names = [spec["name"] for spec in specs]
    try:
        ep = torch.export.export(module, tuple(examples), dynamic_shapes=tuple(shapes), strict=False)
        model = lower_exported(ep, tuple(examples), names, ["experts_out"], dims, opset, optimize)
    except UnsupportedError:
        raise
    except Exception as exc:
        raise UnsupportedError(f"expert_cache: lowering the experts part of {label} failed: "
                               f"{first_line(exc)}") from None
    model.metadata_props.add(key="memc.graph", value="experts")
    return model


def _with_boundaries(graph: DecodeGraph, regions: list[ExpertRegion]) -> list[list[str]]:
    """Add every region's inputs and output as outputs of the decode graph; returns their names per site."""
    gm = graph.module
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(out_node.args[0])
    names: list[list[str]] = []
    for i, r in enumerate(regions):
        site_names = [f"memc_moe{i}_rows{j}" for j in range(len(r.rows))] + [f"memc_moe{i}_ids", f"memc_moe{i}_out"]
        values += [*r.rows, r.ids, r.output]
        names.append(site_names)
    out_node.args = (tuple(values),)
    gm.recompile()
    return names


def _bytes_of(model: onnx.ModelProto) -> int:
    return int(sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def write_store(gm: fx.GraphModule, sites: list[MoESite], path: Path) -> list[dict[str, Any]]:
    """``experts.bin``: per layer, per expert, the expert's rows of each expert tensor back to back (C order);
    returns each layer's record layout."""
    layers, offset = [], 0
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for site in sites:
            tensors = [get_attr_tensor(gm, p).detach().contiguous() for p in site.expert_params]
            arrays = [t.numpy() for t in tensors]
            parts, inner = [], 0
            for p, a in zip(site.expert_params, arrays):
                parts.append({"param": p, "offset": inner, "shape": list(a.shape[1:]), "dtype": str(a.dtype)})
                inner += a[0].nbytes
            record = -(-inner // _ALIGN) * _ALIGN
            layers.append({"site": site.path, "layer": site.layer, "experts": site.num_experts, "top_k": site.top_k,
                           "offset": offset, "record_bytes": record, "expert_bytes": inner, "tensors": parts})
            pad = b"\0" * (record - inner)
            for e in range(site.num_experts):
                for a in arrays:
                    f.write(np.ascontiguousarray(a[e]).tobytes())
                f.write(pad)
            offset += record * site.num_experts
    return layers


def build_expert_cache(program: Program, out_dir: Path, slots: int, opset: int = 18, optimize: bool = True,
                       plan: CachePlan | None = None) -> dict[str, Any]:
    """Write ``out_dir/expert_cache/`` (see the module docstring); returns the layout report.json records. A
    ``plan`` from check_expert_cache is used up (its decode graph gets the cut values as extra outputs)."""
    plan = plan or check_expert_cache(program, slots)
    graph, regions, sites = plan.graph, plan.regions, plan.sites
    root = out_dir / DIR
    root.mkdir(parents=True, exist_ok=True)
    experts, lowered = [], {}
    for i, region in enumerate(regions):  # layers of one architecture share one experts graph (it has no weights)
        module, names = experts_module(graph.module, region)
        specs = experts_specs(graph.module, region, names)
        key = (_structure(module), json.dumps([{k: v for k, v in sp.items() if k != "param"} for sp in specs]))
        if key not in lowered:
            lowered[key] = f"experts_{len(lowered)}.onnx"
            _save(lower_experts(module, specs, region.label, opset, optimize), root / lowered[key])
        experts.append({"file": lowered[key], "inputs": specs, "output": "experts_out"})
    boundary = _with_boundaries(graph, regions)
    try:
        ep = export_decode(graph)
        dim_names = {name: {a: s.name for a, s in axes.items()} for name, axes in graph.dims().items()}
        full = lower_exported(ep, graph.example_inputs(), graph.input_names,
                              graph.output_names + [n for names in boundary for n in names], dim_names, opset,
                              optimize, debug_metadata=True)
    except Exception as exc:
        raise UnsupportedError(f"expert_cache: lowering the decode form of {program.source.path} failed: "
                               f"{first_line(exc)}") from None
    needs = [names[:-1] for names in boundary]
    cuts = [names[-1] for names in boundary]
    try:
        segments = split_segments(full, needs, cuts)
    except ValueError as exc:
        raise UnsupportedError(f"expert_cache: cannot cut the decode graph at its MoE sites: {exc}") from None
    expert_inits = {p for s in sites for p in s.expert_params}
    seg_entries = []
    for s, seg in enumerate(segments):
        leaked = [t.name for t in seg.model.graph.initializer if t.name in expert_inits]
        if leaked:
            raise UnsupportedError(f"expert_cache: segment {s} still holds expert weights {leaked[:3]}")
        strip_exporter_metadata(seg.model)
        seg.model.metadata_props.add(key="memc.graph", value=f"expert_cache.segment{s}")
        _save(seg.model, root / f"segment_{s}.onnx")
        seg_entries.append({"file": f"segment_{s}.onnx", "inputs": seg.inputs, "outputs": seg.outputs,
                            "weight_bytes": _bytes_of(seg.model)})
    store = write_store(graph.module, sites, root / STORE)
    for entry, names, layer in zip(experts, boundary, store):
        entry["rows"] = names[:-2]
        entry["ids"] = names[-2]
        entry["out"] = names[-1]
        layer["expert_bytes_total"] = layer["expert_bytes"] * layer["experts"]
    manifest = {
        "format": FORMAT,
        "slots": slots,
        "vocab_size": graph.vocab_size,
        "max_seq_len": graph.max_seq_len or 0,
        "inputs": graph.input_names,
        "outputs": graph.output_names,
        "state": [s.as_dict() for s in graph.state],
        "segments": seg_entries,
        "experts": experts,
        "store": {"file": STORE, "bytes": (root / STORE).stat().st_size, "layers": store},
    }
    with atomic_file(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    resident = sum(e["weight_bytes"] for e in seg_entries) + slots * sum(l["expert_bytes"] for l in store)
    full_bytes = sum(e["weight_bytes"] for e in seg_entries) + sum(l["expert_bytes_total"] for l in store)
    return {
        "dir": DIR, "manifest": f"{DIR}/{MANIFEST}", "slots": slots, "layers": len(sites),
        "experts": [s.num_experts for s in sites], "top_k": [s.top_k for s in sites],
        "segments": [{k: v for k, v in e.items()} for e in seg_entries],
        "experts_graphs": [{"file": e["file"], "inputs": [i["name"] for i in e["inputs"]]} for e in experts],
        "store": {"file": f"{DIR}/{STORE}", "bytes": manifest["store"]["bytes"], "layers": store},
        "bytes_resident": resident, "bytes_full": full_bytes,
        "state": manifest["state"],
    }


def _save(model: onnx.ModelProto, path: Path) -> None:
    with atomic_file(path) as tmp:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))
