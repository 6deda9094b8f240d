"""Every supported model family compiles to ONNX and matches the original.

Seven real transformers architectures (tiny configs, see tests/helpers.py) and two hand-written attention models.
Each is compiled once per session (``compiled`` fixture); the tests then check the CLI result, the report memc wrote,
and, independently of memc's own verification, the ONNX file in onnxruntime against the original model rebuilt from
scratch, on fresh inputs of shapes the capture never saw. Run with ``-s`` to see ``FAMILY max|Δ|=...`` lines (they
are also listed in the terminal summary).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import (
    DEFAULT_ATOL,
    TINY_FAMILIES,
    VOCAB,
    load_hf_original,
    max_abs_diff,
    onnx_input_dims,
    ort_session,
    record_diff,
    run_onnx,
    token_batch,
)

HANDWRITTEN = {
    "mha": "tests.fixtures.handwritten:mha_model",
    "manual-attention": "tests.fixtures.handwritten:causal_attention_model",
}
ALL_MODELS = [*TINY_FAMILIES, *HANDWRITTEN]

# (batch, seq) for the independent check: none equals the capture example (batch 2, seq 32 / 12); one is longer.
CHECK_SHAPES = [(3, 11), (1, 45)]


def _source(name: str, tiny_hf) -> str:
    return HANDWRITTEN[name] if name in HANDWRITTEN else str(tiny_hf(name))


@pytest.fixture(params=ALL_MODELS)
def family(request, tiny_hf, compiled):
    name = request.param
    return name, compiled(_source(name, tiny_hf))


def test_compile_exits_zero_and_writes_artifacts(family):
    name, res = family
    assert res.rc == 0, res.explain()
    assert res.onnx_path.is_file() and res.onnx_path.stat().st_size > 0
    assert (res.out_dir / "report.json").is_file()
    assert (res.out_dir / "summary.txt").is_file()
    assert "PASSED" in res.stderr


def test_report_verification(family):
    name, res = family
    assert res.rc == 0, res.explain()
    ver = res.report["verification"]
    assert ver["passed"] is True
    assert ver["max_abs_diff"], "no outputs were verified"
    for output, diff in ver["max_abs_diff"].items():
        assert 0 <= diff <= DEFAULT_ATOL, f"{name}: {output} max |Δ| {diff}"
    # memc proved the dynamic axes with at least one sample of another shape than the capture example
    shapes = {tuple(tuple(s) for s in sample["shapes"].values()) for sample in ver["samples"]}
    assert len(shapes) >= 2, f"{name}: every verification sample had the example's shape"


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_hf_report_facts(name, tiny_hf, compiled):
    res = compiled(str(tiny_hf(name)))
    assert res.rc == 0, res.explain()
    fam = TINY_FAMILIES[name]
    src = res.report["source"]
    assert src["kind"] == "hf" and src["task"] == fam.task and src["vocab_size"] == VOCAB
    assert src["details"]["moe"] is fam.moe
    expected_inputs = ["input_ids"] if fam.task == "causal-lm" else ["input_ids", "attention_mask"]
    assert list(res.report["compiled"]["inputs"]) == expected_inputs
    for spec in res.report["compiled"]["inputs"].values():
        assert spec["dynamic"]["0"]["name"] == "batch" and spec["dynamic"]["1"]["name"] == "seq"
    dims = onnx_input_dims(res.onnx_path)
    assert dims == {n: ["batch", "seq"] for n in expected_inputs}


def _independent_hf(name: str, tiny_hf, res) -> float:
    fam = TINY_FAMILIES[name]
    model = load_hf_original(tiny_hf(name), moe=fam.moe)
    sess = ort_session(res.onnx_path)
    worst = 0.0
    for i, (batch, seq) in enumerate(CHECK_SHAPES):
        # padding on every row but the first (the first row is the unpadded reference)
        batch_in = token_batch(batch, seq, seed=1000 + i, pad=[0] + [2 + 3 * r for r in range(batch - 1)])
        with torch.no_grad():
            if fam.task == "causal-lm":
                expected = model(input_ids=batch_in["input_ids"], use_cache=False).logits
                feeds = {"input_ids": batch_in["input_ids"]}
            else:
                assert batch == 1 or int(batch_in["attention_mask"].sum()) < batch * seq  # padding is exercised
                expected = model(**batch_in).last_hidden_state
                feeds = batch_in
        (actual,) = run_onnx(sess, feeds)
        worst = max(worst, max_abs_diff(expected, actual))
    return worst


def _independent_handwritten(name: str, res) -> float:
    module_name, func = HANDWRITTEN[name].split(":")
    module, example = getattr(importlib.import_module(module_name), func)()
    sess = ort_session(res.onnx_path)
    worst = 0.0
    for i, (batch, seq) in enumerate(CHECK_SHAPES):
        x = torch.randn(batch, seq, example[0].shape[-1], generator=torch.Generator().manual_seed(2000 + i))
        with torch.no_grad():
            expected = module(x)
        (actual,) = run_onnx(sess, {"x": x})
        worst = max(worst, max_abs_diff(expected, actual))
    return worst


def test_artifact_matches_original_independently(family, tiny_hf):
    """The ONNX file in onnxruntime vs the original model (rebuilt, not memc's captured program), fresh shapes."""
    name, res = family
    assert res.rc == 0, res.explain()
    worst = _independent_hf(name, tiny_hf, res) if name in TINY_FAMILIES else _independent_handwritten(name, res)
    record_diff(name, worst)
    assert worst <= DEFAULT_ATOL, f"{name}: max |Δ| {worst:.3g} > {DEFAULT_ATOL}"
