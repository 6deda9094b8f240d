"""toolchain.toml -> ToolchainConfig: the shipped file, key paths in errors, and pass options."""
from __future__ import annotations

import dataclasses
import re
import sys
import uuid
from pathlib import Path
from typing import Literal

import pytest

import memc.passes.base as passes_base
from memc.compiler import make_plan
from memc.config import (
    CalibrationConfig,
    InputsConfig,
    InstrumentsConfig,
    ModelConfig,
    OutputConfig,
    PassSpec,
    TargetConfig,
    TensorSpec,
    ToolchainConfig,
    load_config,
    parse_config,
)
from memc.errors import ConfigError, PassError
from memc.passes.base import NoOptions, Pass, PassResult, create_pass, register_pass
from memc.schema import option, to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "toolchain.toml"

SECTIONS = {
    "model": ModelConfig,
    "inputs": InputsConfig,
    "calibration": CalibrationConfig,
    "instruments": InstrumentsConfig,
    "target": TargetConfig,
    "output": OutputConfig,
}


def _err(data):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# -- the shipped toolchain.toml ------------------------------------------------------------------------------------


def test_shipped_toolchain_parses_into_the_dataclasses():
    cfg = load_config(SHIPPED)
    assert isinstance(cfg, ToolchainConfig)
    for name, cls in SECTIONS.items():
        assert type(getattr(cfg, name)) is cls, name
    assert cfg.pipeline == [PassSpec("eliminate-dead-code", {}, "pipeline[0]")]
    assert cfg.target.name == "onnx" and cfg.target.opset == 23


def test_shipped_toolchain_shows_the_defaults():
    """The file says 'the value shown is the default': parsing it gives ToolchainConfig() (bar the pipeline)."""
    shipped = to_dict(load_config(SHIPPED))
    default = to_dict(ToolchainConfig())
    shipped.pop("pipeline"), default.pop("pipeline")
    assert shipped == default


def test_shipped_toolchain_documents_every_key():
    """Every option of every section appears in the shipped file (set or in the commented example)."""
    text = SHIPPED.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert set(data) - {"pipeline"} == {"seed", *SECTIONS}
    for name, cls in SECTIONS.items():
        documented = set(data[name])
        if name == "inputs":
            documented.add("tensors")  # shown as a commented [[inputs.tensors]] block
        assert documented == {f.name for f in dataclasses.fields(cls)}, name
    commented = set(re.findall(r"^# (\w+) += ", text, flags=re.M))
    assert {f.name for f in dataclasses.fields(TensorSpec)} <= commented


def test_shipped_commented_tensor_example_is_valid():
    """Uncommenting the [[inputs.tensors]] example gives a valid config."""
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("# [[inputs.tensors]]"))
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    data = tomllib.loads("\n".join(block))
    cfg = parse_config({"inputs": data["inputs"]})
    (spec,) = cfg.inputs.tensors
    assert spec == TensorSpec("x", [2, 16, 64], "float32", {"0": "batch", "1": "seq"}, 0)


def test_no_config_gives_defaults_with_an_empty_pipeline():
    cfg = load_config(None)
    assert cfg == ToolchainConfig()
    assert cfg.pipeline == []


# -- errors name the key path ----------------------------------------------------------------------------------------


def test_unknown_section_key_suggests():
    msg = _err({"target": {"opsett": 18}})
    assert msg.startswith("target.opsett: unknown key")
    assert "did you mean 'opset'" in msg


def test_unknown_top_level_section():
    msg = _err({"tagret": {"opset": 18}})
    assert msg.startswith("tagret: unknown key")
    assert "did you mean 'target'" in msg


@pytest.mark.parametrize(
    "data, prefix",
    [
        ({"inputs": {"batch": "two"}}, "inputs.batch: expected int, got str 'two'"),
        ({"inputs": {"batch": True}}, "inputs.batch: expected int, got bool True"),
        ({"inputs": {"dynamic_batch": 1}}, "inputs.dynamic_batch: expected bool (true/false), got int 1"),
        ({"instruments": {"pass_atol": True}}, "instruments.pass_atol: expected float, got bool True"),
        ({"seed": 1.5}, "seed: expected int, got float 1.5"),
        ({"model": "x.pt2"}, "model: expected a table, got str 'x.pt2'"),
        ({"target": {"verify_shapes": [[1, "a"]]}}, "target.verify_shapes[0][1]: expected int, got str 'a'"),
        ({"target": {"verify_shapes": [1, 7]}}, "target.verify_shapes[0]: expected list[int], got int 1"),
    ],
)
def test_wrong_types_name_the_key(data, prefix):
    assert _err(data).startswith(prefix)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"model": {"kind": "onnx"}}, "model.kind: 'onnx' is not one of 'auto', 'pt2', 'hf', 'factory', 'pickle'"),
        ({"target": {"name": "tensorrt"}}, "target.name: 'tensorrt' is not one of 'onnx'"),
        ({"calibration": {"tokenizer": "sentencepiece"}}, "calibration.tokenizer: 'sentencepiece' is not one of 'auto', 'bytes', 'hf'"),
    ],
)
def test_literal_choices_are_listed(data, expected):
    assert _err(data) == expected


def test_tensor_spec_paths():
    ok = {"name": "x", "shape": [2, 3]}
    msg = _err({"inputs": {"tensors": [ok, {"name": "y", "shape": [2], "dtype": "float33"}]}})
    assert msg.startswith("inputs.tensors[1].dtype: 'float33' is not one of 'float32'")
    assert _err({"inputs": {"tensors": [{"name": "x"}]}}) == "inputs.tensors[0].shape: required key is missing (list[int])"
    assert _err({"inputs": {"tensors": [{"shape": [1]}]}}) == "inputs.tensors[0].name: required key is missing (str)"
    msg = _err({"inputs": {"tensors": [{"name": "x", "shape": [2, "3"]}]}})
    assert msg.startswith("inputs.tensors[0].shape[1]: expected int")
    msg = _err({"inputs": {"tensors": [{"name": "x", "shape": [2], "dynamic": {"0": 1}}]}})
    assert msg.startswith("inputs.tensors[0].dynamic.0: expected string")
    msg = _err({"inputs": {"tensors": [{"name": "x", "shape": [2, 3], "dynamc": {}}]}})
    assert msg.startswith("inputs.tensors[0].dynamc: unknown key") and "did you mean 'dynamic'" in msg


def test_semantic_validation_names_the_section():
    assert "inputs.tensors[0]: dynamic axis '5'" in _err(
        {"inputs": {"tensors": [{"name": "x", "shape": [2, 3], "dynamic": {"5": "batch"}}]}}
    )
    assert _err({"target": {"opset": 17}}).startswith("target: opset 17 is outside the supported range 18..23")
    assert _err({"inputs": {"batch": 1}}).startswith("inputs: a dynamic batch axis needs an example batch >= 2")
    assert parse_config({"inputs": {"batch": 1, "dynamic_batch": False}}).inputs.batch == 1
    assert _err({"calibration": {"num_samples": 0}}).startswith("calibration: num_samples must be >= 1")
    assert _err({"target": {"verify_shapes": [[1]]}}).startswith("target: verify_shapes entries are [batch, seq]")


def test_pipeline_shape_errors():
    assert _err({"pipeline": {"pass": "x"}}).startswith("pipeline: expected an array of tables")
    assert _err({"pipeline": ["eliminate-dead-code"]}).startswith("pipeline[0]: expected a table")
    assert _err({"pipeline": [{"pass": "eliminate-dead-code"}, {"options": 1}]}).startswith("pipeline[1].pass: required")
    assert _err({"pipeline": [{"pass": 3}]}).startswith("pipeline[0].pass: required string")


def test_pipeline_keeps_raw_options_and_paths():
    cfg = parse_config({"pipeline": [{"pass": "a"}, {"pass": "b", "threshold": 0.5, "mode": "x"}]})
    assert cfg.pipeline == [PassSpec("a", {}, "pipeline[0]"), PassSpec("b", {"threshold": 0.5, "mode": "x"}, "pipeline[1]")]


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[target\nopset = 18\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(binary)
    nested = tmp_path / "nested.toml"
    nested.write_text('[[inputs.tensors]]\nname = "x"\nshape = [2, 4]\ndtype = "int65"\n')
    with pytest.raises(ConfigError, match=re.escape("inputs.tensors[0].dtype: 'int65' is not one of")):
        load_config(nested)


def test_cli_overrides(tmp_path):
    from memc.cli import _config, build_parser

    args = build_parser().parse_args(
        ["compile", "m:f", "--config", str(SHIPPED), "--seed", "7", "--dump-ir", "--target", "onnx"]
    )
    cfg = _config(args)
    assert cfg.seed == 7 and cfg.instruments.dump_ir is True and cfg.target.name == "onnx"


# -- pass options are validated against the pass's Config --------------------------------------------------------------


@pytest.fixture
def option_pass():
    """A registered pass with typed options; removed from the registry afterwards."""

    @dataclasses.dataclass
    class Config:
        threshold: float = option(0.5, "a float option")
        mode: Literal["fast", "exact"] = option("exact", "a choice")
        layers: list[int] = option(factory=list, doc="a list option")

    name = f"test-options-{uuid.uuid4().hex[:8]}"
    cls = type("OptionPass", (Pass,), {"name": name, "Config": Config, "run": lambda self, p, c: PassResult(p, False)})
    register_pass(cls)
    yield name
    passes_base._REGISTRY.pop(name, None)
    passes_base._ORIGINS.pop(name, None)


def test_pass_options_are_validated_with_the_pipeline_path(option_pass):
    p = create_pass(option_pass, {"threshold": 1, "mode": "fast", "layers": [0, 2]}, "pipeline[1]")
    assert p.config.threshold == 1.0 and p.config.mode == "fast" and p.config.layers == [0, 2]
    cases = [
        ({"threshold": "high"}, "pipeline[1].threshold: expected float, got str 'high'"),
        ({"mode": "slow"}, "pipeline[1].mode: 'slow' is not one of 'fast', 'exact'"),
        ({"layers": [0, "1"]}, "pipeline[1].layers[1]: expected int, got str '1'"),
    ]
    for options, expected in cases:
        with pytest.raises(ConfigError) as info:
            create_pass(option_pass, options, "pipeline[1]")
        assert str(info.value) == expected
    with pytest.raises(ConfigError) as info:
        create_pass(option_pass, {"treshold": 0.1}, "pipeline[1]")
    assert str(info.value).startswith("pipeline[1].treshold: unknown key. did you mean 'threshold'?")
    assert "layers, mode, threshold" in str(info.value)


def test_pass_without_options_rejects_any(option_pass):
    with pytest.raises(ConfigError, match=re.escape("pipeline[0].level: unknown key. Valid keys here: (none)")):
        create_pass("eliminate-dead-code", {"level": 2}, "pipeline[0]")


def test_unknown_pass_lists_the_registered_passes(option_pass):
    with pytest.raises(ConfigError) as info:
        create_pass("eliminate-dead-cod", {}, "pipeline[3]")
    msg = str(info.value)
    assert msg.startswith("pipeline[3].pass: unknown pass 'eliminate-dead-cod'")
    assert "did you mean 'eliminate-dead-code'" in msg
    listing = msg.rsplit("Valid", 1)[1]  # the registered passes, plugins and test passes included
    assert "eliminate-dead-code" in listing and option_pass in listing


def test_make_plan_validates_pass_options_from_toml(option_pass, tmp_path):
    """A bad option in the second [[pipeline]] entry fails plan creation, before any model is loaded."""
    toml = tmp_path / "toolchain.toml"
    toml.write_text(
        '[[pipeline]]\npass = "eliminate-dead-code"\n\n'
        f'[[pipeline]]\npass = "{option_pass}"\nthreshold = "high"\n'
    )
    cfg = load_config(toml)
    with pytest.raises(ConfigError, match=re.escape("pipeline[1].threshold: expected float, got str 'high'")):
        make_plan("does/not/exist.pt2", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_make_plan_checks_pass_order_from_toml(tmp_path):
    name = f"test-needs-{uuid.uuid4().hex[:8]}"
    cls = type("Needs", (Pass,), {"name": name, "Config": NoOptions, "requires": frozenset({"test.sites"})})
    register_pass(cls)
    try:
        cfg = parse_config({"pipeline": [{"pass": "eliminate-dead-code"}, {"pass": name}]})
        with pytest.raises(PassError, match=re.escape(f"pipeline[1] ('{name}') requires 'test.sites'")):
            make_plan("m:f", cfg, tmp_path / "out")
    finally:
        passes_base._REGISTRY.pop(name, None)
        passes_base._ORIGINS.pop(name, None)
