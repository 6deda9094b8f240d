"""How plain causal attention lowers for onnxruntime: the form is picked by measurement, per onnxruntime version.

Two uses, two torch ops (the plain-torch reference every lowering is tested against) and their ONNX translations:

* ``memc::causal_attention(q, k, v, seqlens_k, total, scale)`` — full-sequence causal attention (model.onnx).
  q [B, Hq, S, D], k / v [B, Hkv, S, D] before any GQA repeat.
* ``memc::cached_attention(q, k, v, past_key, past_value, seqlens_k, total, scale)`` — attention over a KV cache
  held in a preallocated buffer [B, Hkv, capacity, D]: the new k / v are written at ``total - S`` (the past
  length) and the query attends to the first ``total`` positions (causally).

``seqlens_k`` [B] (int32, total - 1 per row) and ``total`` (int32 scalar) are GroupQueryAttention's own length
inputs; the graph computes them once (``lengths``) and every layer reads them. Returns (y, present_key, present_value) with the
  buffer's shape. onnxruntime's GroupQueryAttention writes in place when the caller binds the present output to
  the past input's memory (DecodeEngine does, with I/O binding), so a step copies one token's k / v, not the cache.

Measured on AMD EPYC (AVX2), onnxruntime 1.32.0, one thread, ref-llama shapes (4 query / 2 KV heads, head_dim
64), one attention op, median ms; ``python -m benchmarks.attention_forms --rounds 3`` on the shared, oversubscribed
2-core machine (absolute times ~2.5x an idle run's; the ranking held in three runs):

| form                                                    | prefill 512 | prefill 1024 | step @1023 | step @8191 |
|---------------------------------------------------------|-------------|--------------|------------|------------|
| opset-23 Attention, bool mask, KV repeated (exporter's) | 56.3        | 217.5        | 0.70       | 43.7       |
| opset-23 Attention, is_causal / past inputs, GQA native | 58.5        | 209.4        | 0.38       | 25.2       |
| com.microsoft MultiHeadAttention, unidirectional        | 51.1        | 224.1        | -          | -          |
| com.microsoft GroupQueryAttention (growing past)        | **40.1**    | **120.3**    | 0.42       | 28.2       |
| GroupQueryAttention, shared past/present buffer         | -           | -            | **0.23**   | **2.0**    |
| decomposed MatMul / Softmax / MatMul                    | 54.4        | 227.0        | 0.67       | 44.9       |
| (torch 2.13 sdpa, enable_gqa; steps without a cache)    | 58.6        | 152.1        | 0.20       | 10.6       |
Steps that grow a past include its copy into the present (what a decode step pays).

These forms run on random q / k, whose softmax has no far tail. A trained model's does: most far-away
probabilities are denormal floats, and on Intel cores each op touching one takes a microcode assist. On an AVX-512
Xeon, ref-llama's real decode step at ~1k context spent 2 of its ~3 ms in GroupQueryAttention (one op on random data
at that length: 67 us), and model.onnx prefilled 1024 tokens at 3,960 tok/s. memc's sessions therefore flush
denormals during their runs (memc.targets.float_env): 1.2 ms and 9,450 tok/s. The forms above were not ranked again
on real attention inputs.

So for these versions both uses lower to GroupQueryAttention; other versions (not measured) keep the standard
ops: the exporter's opset-23 Attention / decomposition for causal attention, and a growing KV cache by Concat.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import onnx
import torch
from onnx.defs import OpSchema

MSFT = "com.microsoft"
GQA = "GroupQueryAttention"


# ---------------------------------------------------------------------------------------------------------------
# The choice, keyed on the onnxruntime version
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lowering:
    """``prefill``: gqa | standard; ``kv_cache``: preallocated (GQA, shared buffer) | concat (growing state)."""

    prefill: str
    kv_cache: str
    measured: str  # the onnxruntime version the choice was measured on, or "" (not measured: standard ops)


# (minimum onnxruntime version, choice); the newest entry not above the installed version applies
MEASURED: list[tuple[tuple[int, int], Lowering]] = [
    ((1, 32), Lowering("gqa", "preallocated", "1.32.0")),
]
STANDARD = Lowering("standard", "concat", "")


def _version(text: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def choose(ort_version: str | None = None, attention: str = "auto") -> Lowering:
    """The lowering for ``ort_version`` (default: the installed onnxruntime); ``attention`` = gqa | standard forces
    one (tests cover both)."""
    if attention == "gqa":
        return MEASURED[-1][1]
    if attention == "standard":
        return STANDARD
    if attention != "auto":
        raise ValueError(f"attention lowering must be auto | gqa | standard, got {attention!r}")
    if ort_version is None:
        try:
            import onnxruntime

            ort_version = onnxruntime.__version__
        except ImportError:
            return STANDARD
    found = STANDARD
    for since, lowering in MEASURED:
        if _version(ort_version) >= since:
            found = lowering
    return found


def gqa_fits(num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int, dtype: torch.dtype) -> bool:
    """What onnxruntime's CPU GroupQueryAttention takes: float32, equal q/v head sizes that are multiples of 8."""
    return (dtype == torch.float32 and head_dim == v_head_dim and head_dim % 8 == 0 and num_kv_heads > 0
            and num_heads % num_kv_heads == 0)


# ---------------------------------------------------------------------------------------------------------------
# torch ops (the references)
# ---------------------------------------------------------------------------------------------------------------
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
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


def lengths(batch, seq, past=None) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's ``seqlens_k`` [batch] and ``total`` (int32) for ``seq`` new tokens after ``past``
    (an int64 scalar tensor, or none)."""
    total = torch.full((), seq, dtype=torch.int64) if past is None else past + seq
    seqlens = (total - 1).to(torch.int32).reshape(1).expand(batch)
    return seqlens, total.to(torch.int32)


@torch.library.custom_op("memc::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens_k: torch.Tensor,
                     total: torch.Tensor, scale: float) -> torch.Tensor:
    return _attend(q, k, v, scale)


@causal_attention.register_fake
def _(q, k, v, seqlens_k, total, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("memc::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Needs ``total <= capacity``; slots after ``total`` are left as they were."""
    seq = q.shape[2]
    length = int(total) - seq
    if int(total) > past_key.shape[2]:
        raise ValueError(f"KV buffer capacity {past_key.shape[2]} < past {length} + {seq} new token(s)")
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, length:length + seq] = k
    present_value[:, :, length:length + seq] = v
    y = _attend(q, present_key[:, :, :length + seq], present_value[:, :, :length + seq], scale)
    return y, present_key, present_value


@cached_attention.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), torch.empty_like(past_key), torch.empty_like(past_value)


# ---------------------------------------------------------------------------------------------------------------
# ONNX translations (for torch.onnx.export's custom_translation_table)
# ---------------------------------------------------------------------------------------------------------------
def _register_schema() -> None:
    """onnx has no schema for contrib ops; the exporter's builder needs one to type the node."""
    try:
        onnx.defs.get_schema(GQA, 1, MSFT)
        return
    except onnx.defs.SchemaError:
        pass
    fp, opt, attr = OpSchema.FormalParameter, OpSchema.FormalParameterOption, OpSchema.Attribute
    ints, floats = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    schema = OpSchema(
        GQA, MSFT, 1,
        inputs=[fp("query", "T"), fp("key", "T", param_option=opt.Optional), fp("value", "T", param_option=opt.Optional),
                fp("past_key", "T", param_option=opt.Optional), fp("past_value", "T", param_option=opt.Optional),
                fp("seqlens_k", "M"), fp("total_sequence_length", "M"),
                fp("cos_cache", "T", param_option=opt.Optional), fp("sin_cache", "T", param_option=opt.Optional)],
        outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", ints, ""), attr("kv_num_heads", ints, ""), attr("scale", floats, ""),
                    attr("do_rotary", ints, "", required=False),
                    attr("rotary_interleaved", ints, "", required=False)],
    )
    onnx.defs.register_schema(schema)


def translations() -> dict:
    """torch op -> onnxscript translation emitting com.microsoft GroupQueryAttention."""
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_schema()
    msft = Opset(MSFT, 1)

    def bsnh(x):  # [B, H, S, D] -> [B, S, H * D], the layout GroupQueryAttention takes
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))

    def bnsh(y, heads: int, dim: int):  # [B, S, H * D] -> [B, H, S, D], what sdpa returns
        return op.Transpose(op.Reshape(y, op.Constant(value_ints=[0, 0, heads, dim])), perm=[0, 2, 1, 3])

    def causal(q, k, v, seqlens_k, total, scale: float):
        heads, dim, kv_heads = q.shape[1], q.shape[3], k.shape[1]
        y, _, _ = msft.GroupQueryAttention(bsnh(q), bsnh(k), bsnh(v), None, None, seqlens_k, total,
                                           num_heads=heads, kv_num_heads=kv_heads, scale=scale, _outputs=3)
        return bnsh(y, heads, dim)

    def cached(q, k, v, past_key, past_value, seqlens_k, total, scale: float):
        heads, dim, kv_heads = q.shape[1], q.shape[3], k.shape[1]
        y, present_key, present_value = msft.GroupQueryAttention(
            bsnh(q), bsnh(k), bsnh(v), past_key, past_value, seqlens_k, total,
            num_heads=heads, kv_num_heads=kv_heads, scale=scale, _outputs=3)
        return bnsh(y, heads, dim), present_key, present_value

    return {torch.ops.memc.causal_attention.default: causal, torch.ops.memc.cached_attention.default: cached}


# ---------------------------------------------------------------------------------------------------------------
# model.onnx: plain causal sites -> memc::causal_attention (lowered to GroupQueryAttention)
# ---------------------------------------------------------------------------------------------------------------
def plain_causal(site) -> bool:
    """A site these ops reproduce exactly: causal mask only, no sinks, no soft-cap."""
    return site.causal and site.mask == "causal" and not site.sinks and not site.softcap


def site_fits(site, q: torch.fx.Node, v: torch.fx.Node) -> bool:
    qv, vv = q.meta.get("val"), v.meta.get("val")
    if qv is None or vv is None:
        return False
    return plain_causal(site) and gqa_fits(site.num_heads, site.num_kv_heads, int(qv.shape[-1]), int(vv.shape[-1]),
                                           qv.dtype)


def fuse_attention(program, attention: str = "auto"):
    """``(program, fused site modules)``: a copy of the Program whose plain causal sites call
    ``memc::causal_attention`` on the k / v heads before the GQA repeat, when the lowering for the installed
    onnxruntime is GroupQueryAttention; otherwise the Program itself, unchanged."""
    from torch import fx

    from memc.passes.attention.detect import detect_attention

    if choose(attention=attention).prefill != "gqa":
        return program, []
    sites = detect_attention(program)
    src = program.module
    by_src = {n.name: n for n in src.graph.nodes}
    chosen = [s for s in sites if site_fits(s, by_src[s.q], by_src[s.v_heads])]
    if not chosen:
        return program, []
    graph = fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(src.graph, val_map)
    graph.output(out)
    gm = fx.GraphModule(src, graph)
    by_name = {n.name: val_map[n] for n in src.graph.nodes if n in val_map}
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(ids):
        batch = gm.graph.call_function(torch.ops.aten.sym_size.int, (ids, 0))
    with gm.graph.inserting_after(batch):
        seq = gm.graph.call_function(torch.ops.aten.sym_size.int, (ids, 1))
    with gm.graph.inserting_after(seq):
        lens = gm.graph.call_function(lengths, (batch, seq))
    with gm.graph.inserting_after(lens):
        seqlens_k = gm.graph.call_function(operator.getitem, (lens, 0))
    with gm.graph.inserting_after(seqlens_k):
        total = gm.graph.call_function(operator.getitem, (lens, 1))
    for site in chosen:
        node = by_name[site.out]
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(
                torch.ops.memc.causal_attention.default,
                (by_name[site.q], by_name[site.k_heads], by_name[site.v_heads], seqlens_k, total, float(site.scale)))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
    drop_dead_masks(gm.graph)
    gm.recompile()
    return program.replace(module=gm), [s.module for s in chosen]


def drop_dead_masks(graph) -> None:
    """Erase dtype/device asserts (they keep a replaced attention's mask chain alive), then dead code."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
