"""Where a decode step's time goes: memc's KV decode.onnx vs onnxruntime-genai's fp32 model of the same weights.

    python -m benchmarks.decode_profile [--model models/ref-llama] [--kv DIR] [--genai DIR] [--past 990]
                                        [--steps 200] [--block 20]

Three views of one step at ``--past`` tokens of context, one thread, in one process, the two sides taking turns
in blocks of ``--block`` steps (a decode loop's own cache behaviour) with the order reversed every turn:

* the graph alone: ``run_with_iobinding`` on each model with its KV buffers bound in place (memc: the engine's
  layout, a buffer of the context length; genai: its shared past/present buffers of ``context_length``);
* the engine: ``DecodeEngine.step`` vs genai's ``Generator.generate_next_token`` (which also picks the greedy
  token); the difference to the graph alone is each engine's own per-step cost;
* onnxruntime's profiler (SessionOptions.enable_profiling): kernel microseconds per step by op type (the sum of
  each node's median over the profiled steps), and node
  counts of each file and of the graph onnxruntime actually runs (optimized_model_filepath).

Wall and CPU (process time) are both reported: on a shared, oversubscribed machine a step's wall time includes
waiting for a core, and which side waits depends on where the scheduler's preemptions land, not on the graph.
Without ``--kv`` / ``--genai`` the artifacts are built first (memc compile with the shipped toolchain.toml and a
decode graph; genai's model builder, fp32, as benchmarks.decode does).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Table, cpu_info, ort_session, run_case


class _Bound:
    """One graph with its step inputs, logits and KV buffers bound (I/O binding), ready to run a step at ``past``."""

    def __init__(self, session, feeds: dict, kv: list[tuple[str, str]], buffer_shape: tuple, vocab: int):
        import numpy as np

        self.session, self.io = session, session.io_binding()
        rng = np.random.default_rng(0)
        self.keep = list(feeds.values())
        for name, value in feeds.items():
            self.io.bind_input(name, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
        logits = np.empty((1, 1, vocab), np.float32)
        self.io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.keep.append(logits)
        for past_name, present_name in kv:
            buf = rng.standard_normal(buffer_shape).astype(np.float32)
            self.keep.append(buf)
            self.io.bind_input(past_name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            self.io.bind_output(present_name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.io)


def _memc_bound(kv_dir: str, past: int, session=None) -> _Bound:
    import numpy as np

    from memc.runtime.engine import DecodeEngine

    engine = DecodeEngine(kv_dir, threads=1)
    spec = engine.state_specs[0]
    capacity = engine.max_seq_len or past + 1
    feeds = {"input_ids": np.array([[5]], np.int64), engine.length_input: np.array(past, np.int64)}
    kv = [(s.name, s.output) for s in engine.state_specs]
    session = session or ort_session(str(engine.path))
    return _Bound(session, feeds, kv, (1, spec.shape[1], capacity, spec.shape[3]), engine.vocab_size)


def _genai_config(genai_dir: str) -> dict:
    return json.loads((Path(genai_dir) / "genai_config.json").read_text())["model"]


def _genai_bound(genai_dir: str, past: int, session=None) -> _Bound:
    import numpy as np

    cfg = _genai_config(genai_dir)
    d = cfg["decoder"]
    names = d["inputs"]
    feeds = {names["input_ids"]: np.array([[5]], np.int64), names["attention_mask"]: np.ones((1, past + 1), np.int64)}
    kv = []
    for layer in range(d["num_hidden_layers"]):
        for kind in ("key", "value"):
            kv.append((names[f"past_{kind}_names"] % layer, d["outputs"][f"present_{kind}_names"] % layer))
    session = session or ort_session(str(Path(genai_dir) / d["filename"]))
    shape = (1, d["num_key_value_heads"], cfg["context_length"], d["head_size"])
    return _Bound(session, feeds, kv, shape, cfg["vocab_size"])


def _turns(cases: dict, steps: int, block: int) -> dict[str, dict[str, float]]:
    """Each case ``steps`` times, in blocks of ``block`` taking turns (order reversed every turn)."""
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    keys = list(cases)
    for turn in range(-(-steps // block)):
        for key in keys if turn % 2 == 0 else keys[::-1]:
            fn = cases[key]
            for _ in range(block):
                t, c = time.perf_counter(), time.process_time()
                fn()
                wall[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
    return {k: {"wall_ms": statistics.median(wall[k]) * 1e3, "cpu_ms": statistics.median(cpu[k]) * 1e3,
                "cpu_mean_ms": statistics.mean(cpu[k]) * 1e3, "n": len(cpu[k])} for k in keys}


def _profile(bound_of, path: str, steps: int, tmp: Path, tag: str) -> dict[str, Any]:
    import onnx

    optimized = str(tmp / f"{tag}-optimized.onnx")
    session = ort_session(path, profile=str(tmp / f"{tag}-profile"), optimized=optimized)
    run = bound_of(session)
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    elapsed = time.perf_counter() - start
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = e["args"]["op_name"]
    by_type: dict[str, float] = collections.defaultdict(float)
    for name, durations in per_node.items():  # each node's median over the steps: a preempted step does not count
        by_type[op_of[name]] += statistics.median(durations)
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][3:]
    return {
        "nodes_file": len(onnx.load(path, load_external_data=False).graph.node),
        "nodes_run": len(onnx.load(optimized, load_external_data=False).graph.node),
        "kernel_us": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "model_run_us": statistics.median(runs) if runs else float("nan"),
        "profiled_step_ms": elapsed / steps * 1e3,
    }


def profile_case(kv: str, genai: str, model: str, past: int, steps: int, block: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from memc.reference import corpus, tokenizer
    from memc.runtime.engine import DecodeEngine

    prompt = tokenizer.encode(corpus.held_out_bytes("code"), tokenizer.load_tokenizer(model))[None, :past]
    prompt = prompt.astype(np.int64)
    out: dict[str, Any] = {}
    # the graph alone
    graphs = {"memc": _memc_bound(kv, past), "genai": _genai_bound(genai, past)}
    out["graph"] = _turns(graphs, steps, block)
    # the engines (state grows by one token a step: restart before the context runs out)
    engine = DecodeEngine(kv, threads=1)
    gm = og.Model(genai)
    cfg = _genai_config(genai)
    budget = min(engine.max_seq_len or 10 ** 9, cfg["context_length"]) - past - 1
    span = max(1, min(block, budget))
    memc_state: dict = {}
    genai_state: dict = {}

    def memc_step():
        if memc_state.get("left", 0) <= 0:
            _, memc_state["s"] = engine.prefill(prompt)
            memc_state["left"] = span
        _, memc_state["s"] = engine.step(np.array([7], np.int64), memc_state["s"])
        memc_state["left"] -= 1

    def genai_step():
        if genai_state.get("left", 0) <= 0:
            params = og.GeneratorParams(gm)
            params.set_search_options(max_length=cfg["context_length"], do_sample=False)
            genai_state["g"] = og.Generator(gm, params)
            genai_state["g"].append_tokens(prompt.astype(np.int32))
            genai_state["left"] = span
        genai_state["g"].generate_next_token()
        genai_state["left"] -= 1

    out["engine"] = _engine_turns({"memc": memc_step, "genai": genai_step}, memc_state, genai_state, steps, span)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        out["profile"] = {
            "memc": _profile(lambda s: _memc_bound(kv, past, s), str(engine.path), 40, tmp, "memc"),
            "genai": _profile(lambda s: _genai_bound(genai, past, s), str(Path(genai) / cfg["decoder"]["filename"]),
                              40, tmp, "genai"),
        }
    import onnxruntime

    out["versions"] = {"onnxruntime": onnxruntime.__version__, "onnxruntime-genai": og.__version__}
    return out


def _engine_turns(steps_of: dict, memc_state: dict, genai_state: dict, steps: int, span: int) -> dict:
    """Like _turns, but a block is one engine's consecutive steps after its own (untimed) prefill."""
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    states = {"memc": memc_state, "genai": genai_state}
    keys = list(steps_of)
    for turn in range(-(-steps // span)):
        for key in keys if turn % 2 == 0 else keys[::-1]:
            states[key]["left"] = 0
            steps_of[key]()  # prefill + a first (untimed) step
            for _ in range(span - 1):
                t, c = time.perf_counter(), time.process_time()
                steps_of[key]()
                wall[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
    return {k: {"wall_ms": statistics.median(wall[k]) * 1e3, "cpu_ms": statistics.median(cpu[k]) * 1e3,
                "cpu_mean_ms": statistics.mean(cpu[k]) * 1e3, "n": len(cpu[k])} for k in keys}


def main(argv: list[str] | None = None) -> None:
    import sys

    from benchmarks.decode import _build_genai, _compile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/ref-llama")
    ap.add_argument("--kv", help="a memc artifact directory with decode.onnx (default: compile one)")
    ap.add_argument("--genai", help="an onnxruntime-genai fp32 model directory (default: build one)")
    ap.add_argument("--past", type=int, default=990)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per side and view")
    ap.add_argument("--block", type=int, default=20, help="consecutive steps per turn")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        kv = args.kv
        if kv is None:
            kv = str(tmp / "kv")
            _compile(args.model, Path(kv), "-c", "toolchain.toml", "--set", "target.decode_graph=true")
        genai = args.genai or _build_genai(args.model, tmp, ("fp32",)).get("genai-fp32")
        if genai is None:
            raise SystemExit("onnxruntime-genai is not installed (pip install memc[peers])")
        res = run_case("benchmarks.decode_profile:profile_case", kv=kv, genai=genai, model=args.model,
                       past=args.past, steps=args.steps, block=args.block)
    cmd = "python -m benchmarks.decode_profile " + " ".join(argv if argv is not None else sys.argv[1:])
    t = Table("decode_profile", cmd.strip(), ["per step @" + str(args.past), "memc decode.onnx (KV)",
                                              "onnxruntime-genai fp32", "memc / genai"])
    g, e, p = res["graph"], res["engine"], res["profile"]

    def row(label: str, a: float, b: float) -> None:
        t.rows.append([label, a, b, f"{a / b:.2f}x" if b else "n/a"])

    row("nodes in the file", p["memc"]["nodes_file"], p["genai"]["nodes_file"])
    row("nodes onnxruntime runs (optimized)", p["memc"]["nodes_run"], p["genai"]["nodes_run"])
    row("graph alone, CPU ms (median)", g["memc"]["cpu_ms"], g["genai"]["cpu_ms"])
    row("graph alone, wall ms (median)", g["memc"]["wall_ms"], g["genai"]["wall_ms"])
    row("engine step, CPU ms (median)", e["memc"]["cpu_ms"], e["genai"]["cpu_ms"])
    row("engine step, wall ms (median)", e["memc"]["wall_ms"], e["genai"]["wall_ms"])
    row("engine's own cost, CPU ms (engine - graph)", e["memc"]["cpu_ms"] - g["memc"]["cpu_ms"],
        e["genai"]["cpu_ms"] - g["genai"]["cpu_ms"])
    row("profiled kernels, us (sum of node medians)", sum(p["memc"]["kernel_us"].values()), sum(p["genai"]["kernel_us"].values()))
    types = list(dict.fromkeys([*p["memc"]["kernel_us"], *p["genai"]["kernel_us"]]))
    for op in types:
        a, b = p["memc"]["kernel_us"].get(op, 0.0), p["genai"]["kernel_us"].get(op, 0.0)
        t.rows.append([f"  {op}, us", a, b, f"{a / b:.2f}x" if b else "-"])
    t.notes.append(
        f"CPU: {cpu_info()}; one thread; onnxruntime {res['versions']['onnxruntime']}, onnxruntime-genai "
        f"{res['versions']['onnxruntime-genai']}. {args.steps} timed steps per side and view, blocks of "
        f"{args.block} in turns (order reversed each turn); engine steps restart from a {args.past}-token prefill "
        "every block. Kernel times come from onnxruntime's profiler (40 steps, each node's median; profiling adds "
        "per-node overhead, so compare them with each other, not with the timings above).")
    t.raw = res
    path = t.write()
    print(t.markdown())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
