"""memc.compile: every kind of source, every form of config, the result a build script gates on, and the CLI as a
thin layer over it (byte-identical artifacts). Bad input: one MemcError each, with the CLI's message, nothing
written."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.export import Dim

import memc
from memc.api import CompileResult, prepare, resolve_config
from memc.config import ToolchainConfig, parse_config
from memc.errors import ArtifactError, CaptureError, ConfigError, MemcError
from memc.passes.base import Pass, PassContext, PassResult
from memc.program import Program
from memc.report import Report
from memc.schema import option
from tests.fixtures.handwritten import TokenMLP, mha_model, mlp_module
from tests.helpers import run_cli

MHA_FACTORY = "tests.fixtures.handwritten:mha_model"


def _without_timings(value: Any) -> Any:
    """A report without wall-clock numbers (the only part two identical compiles may differ in)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _assert_same(a: Any, b: Any, path: str = "report") -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=0.5, abs_tol=1e-5), f"{path}: {a} != {b}"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _files(out: Path) -> dict[str, bytes]:
    skip = ("report.json", "summary.txt")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in skip and not p.name.startswith(".")}


# -- the CLI is a thin layer over memc.compile ------------------------------------------------------------------------


def test_cli_and_api_write_byte_identical_artifacts(compiled, tiny_llama_dir, tmp_path):
    """`memc compile DIR -o OUT` and memc.compile(DIR, output=OUT): the same bytes, the same report bar timings."""
    cli = compiled(tiny_llama_dir)
    assert cli.rc == 0, cli.explain()
    api = memc.compile(tiny_llama_dir, output=tmp_path / "api", quiet=True)
    assert sorted(_files(cli.out_dir)) == ["model.onnx"]
    assert _files(cli.out_dir) == _files(api.out_dir)
    # verification numbers are onnxruntime's float noise (~1e-6), which depends on the thread count in effect when
    # each compile ran (the CLI artifact is a session fixture, built earlier by another test): same keys and
    # verdicts, numbers equal to within that noise; the artifacts themselves are byte-identical (above)
    ours = _without_timings(dict(api.report))
    # the session's CLI compile may come from another test worker, whose own copy of the tiny model it read
    theirs = _without_timings(cli.report)
    assert Path(theirs["source"]["path"]).name == Path(ours["source"]["path"]).name
    ours["source"] = {**ours["source"], "path": theirs["source"]["path"]}
    _assert_same(theirs, ours)
    assert (cli.out_dir / "summary.txt").is_file() and (api.out_dir / "summary.txt").is_file()


def test_in_memory_module_compiles_like_its_factory(compiled, tmp_path):
    """The factory's module given in memory (with its example inputs): the same model.onnx as `memc compile FACTORY`."""
    module, x = mha_model()
    res = memc.compile(module, example_inputs=x, output=tmp_path / "out", quiet=True)
    cli = compiled(MHA_FACTORY)
    assert cli.rc == 0, cli.explain()
    assert (tmp_path / "out" / "model.onnx").read_bytes() == cli.onnx_path.read_bytes()
    assert res.report["source"]["kind"] == "module"
    assert res.report["source"]["path"] == "<in-memory tests.fixtures.handwritten.MHABlock>"
    assert len(res.report["source"]["sha256"]) == 64
    for key in ("verification", "compiled", "target"):
        assert _without_timings(res.report[key]) == _without_timings(cli.report[key]), key


# -- an in-memory module with the build script's own pass -------------------------------------------------------------


@dataclasses.dataclass
class ShiftOptions:
    module: str = option("down", "which Linear's bias to shift")
    delta: float = option(0.5, "added to every bias element")


class ShiftBias(Pass):
    """Adds delta to one Linear's bias, in place (an approximate pass: outputs move on purpose)."""

    name = "shift-bias"  # not registered anywhere
    Config = ShiftOptions
    tolerance = None

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        params = dict(program.module.named_parameters())
        bias = params[f"{self.config.module}.bias"]
        with torch.no_grad():
            bias.add_(self.config.delta)  # in place: must not reach the caller's model
        return PassResult(program, True, {"shifted": bias.numel()})


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    module = mlp_module().train()  # a model fresh from training: memc captures in eval mode, then restores this
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))
    config = {"seed": 3, "pipeline": [{"pass": "eliminate-dead-code"}, ShiftBias(ShiftOptions(delta=0.25))]}
    out = tmp_path_factory.mktemp("api-shift") / "out"
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    res = memc.compile(module, example_inputs=(x,), dynamic_axes={"x": {0: "batch"}}, config=config, output=out,
                       quiet=True)
    after = {"training": module.training, "state": {k: v.clone() for k, v in module.state_dict().items()},
             "rng_continues": torch.equal(torch.rand(3), expected_draw)}
    return module, before, after, x, res


def test_result_carries_report_verification_and_program(shifted):
    module, _, _, x, res = shifted
    assert isinstance(res, CompileResult) and res.out_dir.is_dir()
    assert isinstance(res.report, Report) and isinstance(res.report, dict)
    assert res.report["schema"] == "memc.report/1" == res.report.schema
    assert res.passed and res.report.passed and res.report.verification.passed
    assert res.max_abs_diff == res.report["verification"]["max_abs_diff"] == res.report.verification.worst
    assert res.report.verification.atol == res.verification.atol == 1e-4
    assert [p.name for p in res.passes] == ["eliminate-dead-code", "shift-bias"]
    assert res.report.passes[1].metrics["shifted"] == 32 and res.report.passes[1].changed
    assert res.report["config"]["pipeline"][1] == {"pass": "shift-bias", "module": "down", "delta": 0.25}
    assert res.artifacts == {"model.onnx": res.out_dir / "model.onnx"}
    assert res.report.artifacts[0].bytes == (res.out_dir / "model.onnx").stat().st_size
    # the program before lowering: the pass's change is in it, and it is what the artifact was verified against
    assert isinstance(res.program, Program)
    with torch.no_grad():
        expected = copy.deepcopy(module).eval()(x)
    shifted_out = res.program(x)[0]
    assert torch.allclose(shifted_out - expected, torch.full_like(expected, 0.25), atol=1e-5)
    onnx_out = memc.load(res.out_dir).run(x.numpy())[0]
    assert np.abs(onnx_out - shifted_out.numpy()).max() <= 1e-4


def test_callers_module_is_left_as_it_was(shifted):
    _, before, after, _, _ = shifted
    assert all(torch.equal(before[k], after["state"][k]) for k in before), "a pass changed the caller's weights"
    assert after["training"], "the caller's train/eval mode is restored"
    assert after["rng_continues"], "the caller's torch generator continues where it was"


def test_dynamic_axes_keep_only_the_named_axes_dynamic(shifted):
    *_, res = shifted
    dims = res.report["compiled"]["inputs"]["x"]["dynamic"]
    assert list(dims) == ["0"] and dims["0"]["name"] == "batch"
    shapes = [s["shapes"]["x"] for s in res.report["verification"]["samples"]]
    assert any(s[0] != 2 for s in shapes), f"a second batch size was verified: {shapes}"
    model = memc.load(res.out_dir)
    assert model.run(np.zeros((5, 12, 32), np.float64))[0].shape == (5, 12, 32)  # float64 is cast, batch is free
    with pytest.raises(ArtifactError, match=re.escape("input 'x' has shape [2, 7, 32]; the model takes [batch, 12, 32]")):
        model.run(np.zeros((2, 7, 32), np.float32))


# -- an ExportedProgram, a typed config and overrides -----------------------------------------------------------------


def test_exported_program_with_a_typed_config(tmp_path):
    module = TokenMLP().eval()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(module, (x,), dynamic_shapes={"x": {0: Dim("b"), 1: Dim("s")}}, strict=False)
    cfg = parse_config({"pipeline": [{"pass": "eliminate-dead-code"}]})
    res = memc.compile(ep, config=cfg, overrides={"target.opset": 21, "seed": 4}, output=tmp_path / "o", quiet=True)
    assert res.passed
    assert res.report["source"]["kind"] == "exported-program"
    assert res.report["config"]["target"]["opset"] == 21 == res.report["target"]["opset"]
    assert res.report["seed"] == 4 and cfg.seed == 0 and cfg.target.opset == 23, "the caller's config is unchanged"
    y = torch.randn(4, 9, 32)
    with torch.no_grad():
        expected = module(y).numpy()
    got = memc.load(tmp_path / "o").run(x=y.numpy())[0]
    assert np.abs(got - expected).max() <= 1e-4


def test_config_forms_agree(tmp_path):
    toml = tmp_path / "toolchain.toml"
    toml.write_text('seed = 5\n[target]\nopset = 20\n[[pipeline]]\npass = "eliminate-dead-code"\n')
    as_dict = {"seed": 5, "target": {"opset": 20}, "pipeline": [{"pass": "eliminate-dead-code"}]}
    from_path = resolve_config(toml)
    assert resolve_config(str(toml)) == from_path == resolve_config(as_dict) == resolve_config(from_path)
    assert resolve_config(None) == ToolchainConfig()
    assert resolve_config(toml, {"target.opset": 21}).target.opset == 21


def test_prepare_is_the_dry_run(tmp_path):
    plan = prepare(MHA_FACTORY, config={"pipeline": [ShiftBias()]}, output=tmp_path / "o")
    lines = plan.describe()
    assert lines[0] == f"model:   {MHA_FACTORY} (factory)"
    assert "  0. shift-bias (module='down', delta=0.5)" in lines
    module, x = mha_model()
    assert prepare(module, example_inputs=x, output=tmp_path / "o2").describe()[0] == "model:   <in-memory tests.fixtures.handwritten.MHABlock> (module)"
    assert not (tmp_path / "o").exists()


# -- bad input: one MemcError each, nothing written --------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class _UnpickleMarker:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad(tmp_path: Path, source: Any, error: type[MemcError] = MemcError, **kwargs) -> str:
    out = tmp_path / "outs" / "out"
    with pytest.raises(error) as info:
        memc.compile(source, output=out, quiet=True, **kwargs)
    assert not (tmp_path / "outs").exists() or os.listdir(tmp_path / "outs") == [], "nothing is written"
    return str(info.value)


def test_module_without_example_inputs(tmp_path):
    msg = _bad(tmp_path, _Tiny(), CaptureError)
    assert msg.startswith("memc cannot infer example inputs for the in-memory module tests.test_api._Tiny")
    assert "example_inputs=" in msg


@pytest.mark.parametrize(
    "inputs, needle",
    [
        (np.zeros((2, 4), np.float32), "example_inputs must be a torch.Tensor or a non-empty tuple of them"),
        ((), "got an empty sequence"),
        ((np.zeros((2, 4), np.float32),), "example_inputs[0] is a numpy.ndarray, expected a torch.Tensor"),
        ({"x": torch.zeros(2, 4)}, "example_inputs must be a torch.Tensor or a non-empty tuple of them"),
    ],
)
def test_example_inputs_of_the_wrong_type(tmp_path, inputs, needle):
    assert needle in _bad(tmp_path, _Tiny(), CaptureError, example_inputs=inputs)


def test_example_inputs_the_forward_does_not_take(tmp_path):
    msg = _bad(tmp_path, _Tiny(), CaptureError, example_inputs=(torch.zeros(2, 4), torch.zeros(2, 4)))
    assert msg == "the model's forward() takes 1 positional inputs but 2 were given"


@pytest.mark.parametrize(
    "axes, needle",
    [
        ({"y": {0: "batch"}}, "dynamic_axes['y']: not an input; the model's inputs are ['x']"),
        ({"x": {2: "batch"}}, "dynamic_axes['x'][2]: not an axis of x (rank 2: axes 0..1)"),
        ({"x": {0: 3}}, "dynamic_axes['x'][0]: the dimension name must be an identifier string, got 3"),
        ({"x": [0]}, "dynamic_axes['x']: expected {axis: dimension name}, got list"),
    ],
)
def test_bad_dynamic_axes(tmp_path, axes, needle):
    assert _bad(tmp_path, _Tiny(), ConfigError, example_inputs=torch.zeros(2, 4), dynamic_axes=axes) == needle


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"target.opsett": 21}, "override target.opsett: unknown key. did you mean 'opset'?"),
        ({"target.opset": "21"}, "override target.opset: expected int, got str '21'"),
        ({"pipeline.0.pass": "x"}, "override pipeline[0]: index out of range; pipeline has no entries"),
    ],
)
def test_bad_overrides(tmp_path, overrides, needle):
    assert _bad(tmp_path, MHA_FACTORY, ConfigError, overrides=overrides).startswith(needle)


def _not_a_pass(program, ctx):
    return program


@pytest.mark.parametrize(
    "entry, needle",
    [
        (_not_a_pass, "pipeline[1]: expected a table with a 'pass' key, or an instance of a memc.passes.Pass "
                      "subclass, got function"),
        (ShiftBias, "pipeline[1]: got the Pass class ShiftBias; give an instance, ShiftBias()"),
        ("shift-bias", "pipeline[1]: expected a table with a 'pass' key, or an instance of a memc.passes.Pass "
                       "subclass, got str 'shift-bias'"),
    ],
)
def test_a_pass_object_that_is_not_a_pass(tmp_path, entry, needle):
    config = {"pipeline": [{"pass": "eliminate-dead-code"}, entry]}
    assert _bad(tmp_path, MHA_FACTORY, ConfigError, config=config) == needle


def test_a_pass_instance_with_a_foreign_config(tmp_path):
    broken = ShiftBias()
    broken.config = {"delta": 1.0}
    msg = _bad(tmp_path, MHA_FACTORY, ConfigError, config={"pipeline": [broken]})
    assert msg == "pipeline[0]: ShiftBias().config is a dict, expected a ShiftBias.Config dataclass instance"


def test_trust_pickle_needed_but_not_given(tmp_path):
    marker = tmp_path / "UNPICKLED"
    torch.save(_UnpickleMarker(marker), tmp_path / "model.pt")
    msg = _bad(tmp_path, tmp_path / "model.pt", CaptureError)
    assert "refusing to load" in msg and "trust_pickle=True" in msg and "--trust-pickle" in msg
    assert not marker.exists(), "memc unpickled the file without trust_pickle"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"example_inputs": torch.zeros(2)}, "example_inputs= is for in-memory sources (nn.Module, ExportedProgram)"),
        ({"config": 3}, "config: expected a toolchain.toml path, a dict or a memc.config.ToolchainConfig, got int"),
    ],
)
def test_misused_arguments(tmp_path, kwargs, needle):
    assert needle in _bad(tmp_path, MHA_FACTORY, ConfigError, **kwargs)


def test_a_source_memc_cannot_read(tmp_path):
    msg = _bad(tmp_path, 3, ConfigError)
    assert msg.startswith("source: expected a model path") and "nn.Module" in msg and "got int" in msg


@pytest.mark.parametrize("source", ["models/llama-7b", "not-a-factory"])
def test_same_message_as_the_cli(tmp_path, source):
    api = _bad(tmp_path, source)
    cli = run_cli(["compile", source, "-o", tmp_path / "outs" / "out"])
    assert cli.rc == 2
    assert cli.stderr.strip() == f"memc: error: {api}"
