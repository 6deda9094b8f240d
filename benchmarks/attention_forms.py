"""Attention forms in onnxruntime (CPU, one thread) at ref-llama's shapes: what memc.codegen.attention's table is
measured with.

    python -m benchmarks.attention_forms [--rounds 5]

One attention op per graph (4 query / 2 KV heads, head_dim 64, batch 1), inputs already in each form's layout:
prefill over 512 and 1024 tokens, and one decode step after 1023 and 8191 cached tokens. Forms: opset-23
Attention with a boolean mask over repeated KV (what the exporter emits for sdpa), opset-23 Attention with
is_causal / past inputs and native GQA, com.microsoft MultiHeadAttention (unidirectional), com.microsoft
GroupQueryAttention (steps: growing past, and a preallocated past/present buffer shared through I/O binding),
the decomposed MatMul / Softmax / MatMul, and torch sdpa for scale. Forms take turns; medians; every output is
checked against a numpy reference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks.harness import Table, cpu_info, run_case

HQ, HKV, D = 4, 2, 64


def _median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _reference(q, k, v):
    k, v = np.repeat(k, HQ // HKV, 1), np.repeat(v, HQ // HKV, 1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    t, n = q.shape[2], k.shape[2]
    s = np.where(np.arange(n)[None] <= np.arange(t)[:, None] + n - t, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _graphs(seq: int, past: int):
    """{form: (model, feeds builder)} for ``seq`` new tokens after ``past`` cached ones."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    f = TP.FLOAT
    vi = h.make_tensor_value_info
    total = past + seq

    def const(name, dtype, dims, vals):
        return h.make_node("Constant", [], [name], value=h.make_tensor(name, dtype, dims, vals))

    def model(nodes, inputs, outputs):
        g = h.make_graph(nodes, "g", inputs, [vi(o, f, None) for o in outputs])
        return h.make_model(g, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)], ir_version=10)

    def repeat(x, out):  # [1, HKV, n, D] -> [1, HQ, n, D]
        return [h.make_node("Unsqueeze", [x, "ax2"], [x + "_u"]), h.make_node("Shape", [x + "_u"], [x + "_s"]),
                h.make_node("Mul", [x + "_s", "rep"], [x + "_r"]), h.make_node("Expand", [x + "_u", x + "_r"], [x + "_e"]),
                h.make_node("Reshape", [x + "_e", "hq"], [out])]

    def bsnh(x, out):
        return [h.make_node("Transpose", [x], [x + "_t"], perm=[0, 2, 1, 3]), h.make_node("Reshape", [x + "_t", "bs"], [out])]

    base = [const("ax2", TP.INT64, [1], [2]), const("rep", TP.INT64, [5], [1, 1, HQ // HKV, 1, 1]),
            const("hq", TP.INT64, [4], [1, HQ, -1, D]), const("bs", TP.INT64, [3], [0, 0, -1]),
            const("sc", f, [], [D ** -0.5])]
    q, k, v = vi("q", f, [1, HQ, seq, D]), vi("k", f, [1, HKV, seq, D]), vi("v", f, [1, HKV, seq, D])
    pk, pv = vi("pk", f, [1, HKV, past, D]), vi("pv", f, [1, HKV, past, D])
    mask = np.arange(total)[None] <= np.arange(seq)[:, None] + past
    lens = [const("sl", TP.INT32, [1], [total - 1]), const("tl", TP.INT32, [], [total])]
    forms = {}
    kin, vin, ins = ("k", "v", [q, k, v]) if not past else ("kc", "vc", [q, k, v, pk, pv])
    cat = [] if not past else [h.make_node("Concat", ["pk", "k"], ["kc"], axis=2), h.make_node("Concat", ["pv", "v"], ["vc"], axis=2)]
    forms["opset-23 Attention, bool mask, KV repeated"] = model(
        base + cat + [const("m", TP.BOOL, [seq, total], mask.flatten().tolist())] + repeat(kin, "ke") + repeat(vin, "ve")
        + [h.make_node("Attention", ["q", "ke", "ve", "m"], ["y"], scale=D ** -0.5)], ins, ["y"])
    if not past:
        forms["opset-23 Attention, is_causal, GQA native"] = model(
            [h.make_node("Attention", ["q", "k", "v"], ["y"], scale=D ** -0.5, is_causal=1)], ins, ["y"])
        forms["MultiHeadAttention, unidirectional, KV repeated"] = model(
            base + repeat("k", "ke") + repeat("v", "ve") + bsnh("q", "q3") + bsnh("ke", "k3") + bsnh("ve", "v3")
            + [h.make_node("MultiHeadAttention", ["q3", "k3", "v3"], ["y"], domain="com.microsoft", num_heads=HQ,
                           unidirectional=1, scale=D ** -0.5)], ins, ["y"])
    else:
        forms["opset-23 Attention, past inputs, GQA native"] = model(
            [h.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "ok", "ov"], scale=D ** -0.5)], ins,
            ["y", "ok", "ov"])
    gqa_in = ["q3", "k3", "v3", *(["pk", "pv"] if past else ["", ""]), "sl", "tl"]
    forms["GroupQueryAttention" + (", growing past" if past else "")] = model(
        base + lens + bsnh("q", "q3") + bsnh("k", "k3") + bsnh("v", "v3")
        + [h.make_node("GroupQueryAttention", gqa_in, ["y", "ok", "ov"], domain="com.microsoft", num_heads=HQ,
                       kv_num_heads=HKV, scale=D ** -0.5)], ins, ["y", "ok", "ov"])
    if past:
        forms["GroupQueryAttention, shared buffer (I/O binding)"] = model(
            base + bsnh("q", "q3") + bsnh("k", "k3") + bsnh("v", "v3")
            + [h.make_node("GroupQueryAttention", ["q3", "k3", "v3", "pk", "pv", "sl", "tl"], ["y", "ok", "ov"],
                           domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV, scale=D ** -0.5)],
            [q, k, v, vi("pk", f, [1, HKV, "cap", D]), vi("pv", f, [1, HKV, "cap", D]), vi("sl", TP.INT32, [1]),
             vi("tl", TP.INT32, [])], ["y", "ok", "ov"])
    add = np.where(mask, 0, -np.inf).astype(np.float32)
    forms["decomposed MatMul / Softmax / MatMul"] = model(
        base + cat + [const("am", f, [seq, total], add.flatten().tolist())] + repeat(kin, "ke") + repeat(vin, "ve")
        + [h.make_node("Transpose", ["ke"], ["kt"], perm=[0, 1, 3, 2]), h.make_node("Mul", ["q", "sc"], ["qs"]),
           h.make_node("MatMul", ["qs", "kt"], ["s"]), h.make_node("Add", ["s", "am"], ["sm"]),
           h.make_node("Softmax", ["sm"], ["p"], axis=-1), h.make_node("MatMul", ["p", "ve"], ["y"])], ins, ["y"])
    return forms


def case(seq: int, past: int, rounds: int) -> dict:
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, HQ, seq, D), np.float32)
    k, v = (rng.standard_normal((1, HKV, past + seq, D), np.float32) for _ in range(2))
    want = _reference(q, k, v)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    runs = {}
    for name, model in _graphs(seq, past).items():
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {"q": q, "k": k[:, :, past:], "v": v[:, :, past:]}
        if past and "shared" in name:
            cap = past + seq
            bk, bv = np.ascontiguousarray(k.copy()), np.ascontiguousarray(v.copy())
            io = sess.io_binding()
            for n, a in (("q", q), ("k", feeds["k"]), ("v", feeds["v"]), ("sl", np.array([cap - 1], np.int32)),
                         ("tl", np.array(cap, np.int32))):
                io.bind_cpu_input(n, np.ascontiguousarray(a))
            io.bind_output("y", "cpu")
            for n, o, a in (("pk", "ok", bk), ("pv", "ov", bv)):
                io.bind_input(n, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
                io.bind_output(o, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)

            def run(sess=sess, io=io):
                sess.run_with_iobinding(io)
                return io.get_outputs()[0].numpy()
        else:
            if past:
                feeds.update(pk=k[:, :, :past], pv=v[:, :, :past])

            def run(sess=sess, feeds=feeds):
                return sess.run(None, feeds)[0]
        runs[name] = run
    tq, tk, tv = torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)
    mask = torch.from_numpy(np.arange(past + seq)[None] <= np.arange(seq)[:, None] + past)

    def sdpa():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=None if not past else mask, is_causal=not past, enable_gqa=True).numpy()
    runs["torch sdpa (enable_gqa)"] = sdpa
    out: dict = {}
    for name, run in runs.items():
        y = run()
        y = y.reshape(1, seq, HQ, D).transpose(0, 2, 1, 3) if y.ndim == 3 else y
        err = float(np.abs(y - want).max())
        if err > 1e-4:
            raise RuntimeError(f"{name}: max |Δ| {err:.2g} against the reference")
        out[name] = []
    for _ in range(rounds):  # take turns
        for name, run in runs.items():
            out[name].append(_median_ms(run, 3 if seq > 1 else 20))
    return {name: statistics.median(v) for name, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import onnxruntime
    import torch

    shapes = [("prefill 512", 512, 0), ("prefill 1024", 1024, 0), ("step @1023", 1, 1023), ("step @8191", 1, 8191)]
    res = {label: run_case("benchmarks.attention_forms:case", seq=s, past=p, rounds=args.rounds) for label, s, p in shapes}
    names = list(dict.fromkeys(n for r in res.values() for n in r if n != "peak_rss_mb"))
    cmd = "python -m benchmarks.attention_forms " + " ".join(argv if argv is not None else sys.argv[1:])
    t = Table("attention_forms", cmd.strip(), ["form (ms, median)", *res])
    for name in names:
        t.rows.append([name, *[res[label].get(name, "-") for label in res]])
    t.notes.append(f"CPU: {cpu_info()}; onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; one thread; "
                   "one op per graph at ref-llama's shapes (4 query / 2 KV heads, head_dim 64); steps that grow a past "
                   "include its copy into the present.")
    t.raw = res
    t.publish()


if __name__ == "__main__":
    main()
