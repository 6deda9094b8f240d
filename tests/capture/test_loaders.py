"""Capture from every source kind: .pt2 archives, trusted pickles, factories with declared inputs; `memc inspect`.

(Refusing a pickle without --trust-pickle and other bad inputs are covered in tests/test_bad_inputs.py.)
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.export import Dim

from tests.fixtures.handwritten import DIM, TokenMLP, mlp_module
from tests.helpers import (
    DEFAULT_ATOL,
    compile_model,
    load_hf_original,
    max_abs_diff,
    onnx_input_dims,
    record_diff,
    run_cli,
    run_onnx,
    write_toml,
)

MLP_TENSORS_TOML = """
    [[inputs.tensors]]
    name = "x"
    shape = [2, 6, 32]
    dtype = "float32"
    dynamic = { 0 = "batch", 1 = "seq" }
"""


class _PT2Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.b(torch.tanh(self.a(features))), dim=-1)


def _check_against(module: torch.nn.Module, onnx_path, shapes, label: str) -> None:
    worst = 0.0
    for i, shape in enumerate(shapes):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3000 + i))
        with torch.no_grad():
            expected = module(x)
        (name,) = onnx_input_dims(onnx_path)
        (actual,) = run_onnx(onnx_path, {name: x})
        worst = max(worst, max_abs_diff(expected, actual))
    record_diff(label, worst)
    assert worst <= DEFAULT_ATOL


# -- .pt2 -----------------------------------------------------------------------------------------------------------
def test_pt2_round_trip(tmp_path):
    torch.manual_seed(0)
    net = _PT2Net().eval()
    ep = torch.export.export(net, (torch.randn(3, 8),), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    archive = tmp_path / "net.pt2"
    torch.export.save(ep, str(archive))

    res = compile_model(archive, tmp_path / "out")
    assert res.rc == 0, res.explain()
    assert res.onnx_path.is_file()
    rep = res.report
    assert rep["source"]["kind"] == "pt2" and len(rep["source"]["sha256"]) == 64
    assert rep["verification"]["passed"] is True
    assert list(rep["compiled"]["inputs"]) == ["features"]  # the forward() argument name
    (spec,) = rep["compiled"]["inputs"].values()
    assert spec["shape"] == [3, 8]
    assert list(spec["dynamic"]) == ["0"], "the archive's dynamic batch axis was lost"
    assert (spec["dynamic"]["0"]["min"], spec["dynamic"]["0"]["max"]) == (1, 64)
    _check_against(net, res.onnx_path, [(5, 8), (1, 8), (64, 8)], "pt2-mlp")


# -- pickle -----------------------------------------------------------------------------------------------------------
def test_trusted_pickle_compiles(tmp_path):
    model = mlp_module()
    path = tmp_path / "mlp.pt"
    torch.save(model, path)  # pickles the whole module (class tests.fixtures.handwritten.TokenMLP)
    cfg = write_toml(tmp_path / "toolchain.toml", MLP_TENSORS_TOML)

    res = compile_model(path, tmp_path / "out", "--config", cfg, "--trust-pickle")
    assert res.rc == 0, res.explain()
    assert res.report["source"]["kind"] == "pickle"
    assert res.report["verification"]["passed"] is True
    assert isinstance(torch.load(path, weights_only=False), TokenMLP)
    _check_against(model, res.onnx_path, [(3, 11, DIM)], "pickle-mlp")


# -- factory returning only a module + [[inputs.tensors]] ------------------------------------------------------------
@pytest.fixture(scope="module")
def factory_compile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("factory")
    cfg = write_toml(tmp / "toolchain.toml", MLP_TENSORS_TOML)
    return compile_model("tests.fixtures.handwritten:mlp_module", tmp / "out", "--config", cfg)


def test_factory_with_declared_inputs_compiles(factory_compile):
    res = factory_compile
    assert res.rc == 0, res.explain()
    assert res.report["source"]["kind"] == "factory"
    assert res.report["verification"]["passed"] is True
    _check_against(mlp_module(), res.onnx_path, [(3, 11, DIM), (1, 40, DIM)], "factory-mlp")


def test_factory_keeps_declared_dynamic_axes(factory_compile):
    res = factory_compile
    assert res.rc == 0, res.explain()
    x = res.report["compiled"]["inputs"]["x"]
    assert x["shape"] == [2, 6, 32] and x["dtype"] == "float32"
    assert {axis: d["name"] for axis, d in x["dynamic"].items()} == {"0": "batch", "1": "seq"}
    assert res.report["capture"]["inputs"]["x"]["dynamic"] == x["dynamic"]
    # the ONNX graph carries the declared names, and only the declared axes are symbolic
    assert onnx_input_dims(res.onnx_path) == {"x": ["batch", "seq", DIM]}


# -- memc inspect -----------------------------------------------------------------------------------------------------
def _hf_parameter_count(directory) -> int:
    model = load_hf_original(directory)
    unique = {id(p): p.numel() for p in model.parameters()}  # parameters() yields a tied weight once
    assert model.config.tie_word_embeddings, "the tiny llama is expected to tie its embeddings"
    return sum(unique.values())


def test_inspect_prints_tables(tiny_llama_dir):
    rc, out, err = run_cli(["inspect", tiny_llama_dir])
    assert rc == 0, err
    assert "parameters per module" in out
    assert "model.layers" in out and "model.model" not in out  # transformers' own module paths
    assert "op histogram" in out
    assert "aten.scaled_dot_product_attention.default" in out
    assert "aten.linear.default" in out


@pytest.fixture(scope="module")
def inspect_json(tiny_llama_dir):
    rc, out, err = run_cli(["inspect", tiny_llama_dir, "--json"])
    assert rc == 0, err
    return json.loads(out)  # stdout must be nothing but the JSON document


def test_inspect_json_structure(inspect_json):
    info = inspect_json
    assert info["source"]["kind"] == "hf" and info["source"]["task"] == "causal-lm"
    assert info["inputs"] == {"input_ids": [2, 32]} and info["outputs"] == ["logits"]
    assert info["op_histogram"]["aten.scaled_dot_product_attention.default"] == 2  # one per layer
    assert sum(m["parameters"] for m in info["modules"]) == info["parameters"]
    assert sum(m["bytes"] for m in info["modules"]) == info["parameter_bytes"]


def test_inspect_json_parameters_match_hf(inspect_json, tiny_llama_dir):
    """`parameters` is the model's parameter count as transformers reports it, the tied embedding counted once."""
    assert inspect_json["parameters"] == _hf_parameter_count(tiny_llama_dir)


def test_inspect_table_breaks_down_hf_model(inspect_json):
    """At the default depth the size table shows the model's parts (embeddings, layers, ...), not one row for the
    whole model: module paths must not carry the capture wrapper's attribute as an extra level."""
    modules = [m["module"] for m in inspect_json["modules"]]
    assert len(modules) >= 3, f"default-depth table has rows {modules}"
    assert any(m.split(".")[-1] == "layers" for m in modules), modules
