"""End to end through the installed console script: `memc compile <tiny llama dir> --target onnx -o out/`."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import (
    DEFAULT_ATOL,
    REPO_ROOT,
    load_hf_original,
    max_abs_diff,
    record_diff,
    run_memc,
    run_onnx,
    token_batch,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_llama_dir):
    work = tmp_path_factory.mktemp("demo")
    res = run_memc(["compile", tiny_llama_dir, "--target", "onnx", "-o", "out/"], cwd=work)
    return work / "out", res


def test_console_script_compiles(demo):
    out, (rc, stdout, stderr) = demo
    assert rc == 0, stderr[-3000:]
    assert "PASSED" in stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "model.onnx", "report.json", "summary.txt",
    ]
    assert "PASSED" in (out / "summary.txt").read_text()
    # how memc's runtime runs the graph, for deployments that build their own session
    session = json.loads((out / "report.json").read_text())["target"]["session"]
    assert session["config"] == {"session.set_denormal_as_zero": "1"} and session["flush_denormals"] is True


def test_demo_logits_match_original(demo, tiny_llama_dir):
    out, (rc, _, stderr) = demo
    assert rc == 0, stderr[-3000:]
    model = load_hf_original(tiny_llama_dir)
    worst = 0.0
    for i, (batch, seq) in enumerate([(3, 11), (2, 64)]):
        ids = token_batch(batch, seq, seed=4000 + i)["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
        (logits,) = run_onnx(out / "model.onnx", {"input_ids": ids})
        worst = max(worst, max_abs_diff(expected, logits))
    record_diff("demo (console script, llama)", worst)
    assert worst <= DEFAULT_ATOL


def test_demo_artifact_identical_to_in_process_compile(demo, tiny_llama_dir, compiled):
    """Determinism across processes: the console script and an in-process compile (same defaults, seed 0)."""
    out, (rc, _, stderr) = demo
    assert rc == 0, stderr[-3000:]
    res = compiled(tiny_llama_dir)
    assert res.rc == 0, res.explain()
    assert (out / "model.onnx").read_bytes() == res.onnx_path.read_bytes()


def test_console_script_factory_from_repo_root():
    """`memc ... tests.fixtures.handwritten:FACTORY` resolves the factory from the working directory (the console
    script, not pytest, has to put it on sys.path). `inspect` captures without lowering, which keeps this fast."""
    from tests.fixtures.handwritten import causal_attention_model

    rc, out, err = run_memc(["inspect", "tests.fixtures.handwritten:causal_attention_model", "--json"], cwd=REPO_ROOT)
    assert rc == 0, err[-3000:]
    info = json.loads(out)
    assert info["source"]["kind"] == "factory"
    assert info["inputs"] == {"x": [2, 12, 32]}
    module, _ = causal_attention_model()
    assert info["parameters"] == sum(p.numel() for p in module.parameters())
    assert info["op_histogram"]["aten.softmax.int"] == 2  # one hand-written attention per layer
