"""Config overrides: ``--set key.path=value`` (text typed by the schema) and ``overrides={"key.path": value}``.

The walk tests enumerate the toolchain schema itself, so a key added to a config dataclass must be added to
``VALID`` here (with a valid non-default value) or the test fails naming it.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

import memc.passes.base as passes_base
from memc.config import TensorSpec, ToolchainConfig, load_config, parse_config
from memc.errors import ConfigError
from memc.overrides import apply_overrides, parse_set_args
from memc.passes.base import Pass, PassResult, register_pass, registered_passes
from memc.schema import option, to_dict
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "toolchain.toml"

# key -> (command-line text, the Python value for overrides=, the value the config then holds)
VALID: dict[str, tuple[str, Any, Any]] = {
    "seed": ("7", 7, 7),
    "model.source": ("models/x", "models/x", "models/x"),
    "model.kind": ("pt2", "pt2", "pt2"),
    "model.task": ("encoder", "encoder", "encoder"),
    "model.dtype": ("bfloat16", "bfloat16", "bfloat16"),
    "inputs.batch": ("3", 3, 3),
    "inputs.seq_len": ("16", 16, 16),
    "inputs.dynamic_batch": ("false", False, False),
    "inputs.dynamic_seq": ("false", False, False),
    "inputs.max_seq_len": ("64", 64, 64),
    "inputs.tensors": ('[{name = "x", shape = [2, 4]}]', [{"name": "x", "shape": [2, 4]}], [TensorSpec("x", [2, 4])]),
    "calibration.source": ("data/calib.txt", "data/calib.txt", "data/calib.txt"),
    "calibration.tokenizer": ("bytes", "bytes", "bytes"),
    "calibration.num_samples": ("3", 3, 3),
    "calibration.seq_len": ("8", 8, 8),
    "instruments.verify_each_pass": ("false", False, False),
    "instruments.pass_atol": ("1e-3", 1e-3, 1e-3),
    "instruments.dump_ir": ("true", True, True),
    "instruments.progress": ("false", False, False),
    "target.name": ("onnx", "onnx", "onnx"),  # the only choice today
    "target.opset": ("21", 21, 21),
    "target.atol": ("2e-4", 2e-4, 2e-4),
    "target.verify_shapes": ("[[2, 9], [1, 3]]", [[2, 9], [1, 3]], [[2, 9], [1, 3]]),
    "target.optimize": ("false", False, False),
    "target.debug_metadata": ("true", True, True),
    "target.decode_graph": ("true", True, True),
    "target.decode_steps": ("16", 16, 16),
    "target.expert_cache.slots": ("8", 8, 8),
    "output.dir": ("out/x", "out/x", "out/x"),
    "output.hf_checkpoint": ("true", True, True),
}
# inside one [[inputs.tensors]] entry (the base config below has one)
TENSOR_VALID: dict[str, tuple[str, Any, Any]] = {
    "name": ("y", "y", "y"),
    "shape": ("[3, 4]", [3, 4], [3, 4]),
    "dtype": ("int64", "int64", "int64"),
    "dynamic": ('{0 = "batch"}', {"0": "batch"}, {"0": "batch"}),
    "high": ("5", 5, 5),
}
WITH_TENSOR = {"inputs": {"tensors": [{"name": "x", "shape": [2, 4]}]}}


def schema_keys(cls: type = ToolchainConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the toolchain schema (tables walked into; lists and dicts are leaves) -> its type."""
    keys: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if cls is ToolchainConfig and f.name == "pipeline":
            continue  # its keys are the passes' options: see the pipeline tests below
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(schema_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hints[f.name]
    return keys


def get(cfg: Any, key: str) -> Any:
    for seg in re.sub(r"\[(\d+)\]", r".\1", key).split("."):
        cfg = cfg[int(seg)] if isinstance(cfg, list) else (cfg[seg] if isinstance(cfg, dict) else getattr(cfg, seg))
    return cfg


def _err(cfg: ToolchainConfig, overrides: dict, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, overrides, **kw)
    return str(info.value)


def _cli_config(*set_args: str, config: Path | None = SHIPPED) -> ToolchainConfig:
    from memc.cli import _config, build_parser

    argv = ["compile", "m:f"] + (["--config", str(config)] if config else [])
    for item in set_args:
        argv += ["--set", item]
    return _config(build_parser().parse_args(argv))


# -- every key of the schema ---------------------------------------------------------------------------------------


def test_valid_covers_every_schema_key():
    keys = set(schema_keys())
    assert set(VALID) == keys, f"add to VALID: {sorted(keys - set(VALID))}; remove: {sorted(set(VALID) - keys)}"
    assert set(TENSOR_VALID) == set(schema_keys(TensorSpec))


@pytest.mark.parametrize("key", sorted(VALID))
def test_every_key_from_text_and_from_python(key):
    text, value, expected = VALID[key]
    base = load_config(SHIPPED)
    from_text = apply_overrides(base, {key: text}, origin="--set", from_text=True)
    from_python = apply_overrides(base, {key: value})
    assert get(from_text, key) == expected
    assert from_python == from_text
    assert get(base, key) != expected or key == "target.name", "the override must change something"
    assert get(load_config(SHIPPED), key) == get(base, key), "the caller's config is not modified"
    # everything else is untouched
    changed = {k for k in schema_keys() if get(from_text, k) != get(base, k)}
    assert changed <= {key}
    # the CLI reaches the same config
    assert _cli_config(f"{key}={text}") == from_text


@pytest.mark.parametrize("field", sorted(TENSOR_VALID))
def test_every_tensor_spec_key(field):
    text, value, expected = TENSOR_VALID[field]
    base = parse_config(WITH_TENSOR)
    key = f"inputs.tensors.0.{field}"
    cfg = apply_overrides(base, {key: text}, origin="--set", from_text=True)
    assert get(cfg, key) == expected
    assert apply_overrides(base, {key: value}) == cfg
    assert apply_overrides(base, {f"inputs.tensors[0].{field}": value}) == cfg  # bracket form too


def _wrong(tp: Any) -> tuple[Any, str]:
    """A wrongly typed value for a key of type ``tp`` and what the error must say."""
    origin = get_origin(tp)
    if origin is Literal:
        return "bogus", "'bogus' is not one of " + ", ".join(repr(a) for a in get_args(tp))
    if tp is bool:
        return "yes", "expected bool (true/false), got str 'yes'"
    if tp in (int, float):
        return "many", f"expected {tp.__name__}, got str 'many'"
    if tp is str:
        return 3, "expected string, got int 3"
    if origin is list:
        return "3", "expected list[", 
    raise AssertionError(f"no wrong value for {tp}")


@pytest.mark.parametrize("key", sorted(VALID))
def test_every_key_rejects_a_wrong_type_naming_it(key):
    value, needle = _wrong(schema_keys()[key])
    base = load_config(SHIPPED)
    if isinstance(value, str):
        msg = _err(base, {key: value}, origin="--set", from_text=True)
        assert msg.startswith(f"--set {key}: "), msg
    else:
        msg = _err(base, {key: value})
        assert msg.startswith(f"override {key}: "), msg
    assert needle in msg


@pytest.mark.parametrize(
    "key, needles",
    [
        ("target.opsett", ["--set target.opsett: unknown key", "did you mean 'opset'", "Valid keys here: atol,"]),
        ("tagret.opset", ["--set tagret: unknown key", "did you mean 'target'", "Valid keys here:", "seed"]),
        ("inputs.tensors.0.name", ["--set inputs.tensors[0]: index out of range; inputs.tensors has no entries"]),
        ("target.verify_shapes.3", ["--set target.verify_shapes[3]: index out of range", "entries 0..0"]),
        ("target.verify_shapes.x", ["--set target.verify_shapes.x: target.verify_shapes is a list; use an index 0..0"]),
        ("target.opset.major", ["--set target.opset.major: target.opset holds int, not a table or a list"]),
        ("pipeline.1.x", ["--set pipeline[1]: index out of range; pipeline has entries 0..0"]),
        ("pipeline.0.level", ["--set pipeline[0].level: unknown key", "Valid keys here: (none)"]),
        ("target..opset", ["not a key path", "pipeline.1.window"]),
    ],
)
def test_bad_paths_name_the_key_and_the_choices(key, needles):
    msg = _err(load_config(SHIPPED), {key: "1"}, origin="--set", from_text=True)
    for needle in needles:
        assert needle in msg, msg


def test_semantic_validation_runs_on_the_result():
    msg = _err(load_config(SHIPPED), {"target.opset": 17})
    assert msg.startswith("target: opset 17 is outside the supported range 18..23 (after override target.opset)")
    msg = _err(load_config(SHIPPED), {"inputs.batch": 1})
    assert "a dynamic batch axis needs an example batch >= 2" in msg
    # ...and accepts the combination that is valid
    assert apply_overrides(load_config(SHIPPED), {"inputs.batch": 1, "inputs.dynamic_batch": False}).inputs.batch == 1


def test_text_values_are_typed_by_the_schema():
    base = ToolchainConfig()
    cfg = apply_overrides(base, {"target.atol": "1", "output.dir": "123", "model.source": "true"}, from_text=True)
    assert cfg.target.atol == 1.0 and isinstance(cfg.target.atol, float)
    assert cfg.output.dir == "123" and cfg.model.source == "true"  # str keys take the text as is
    assert _err(base, {"seed": "1.5"}, origin="--set", from_text=True) == "--set seed: expected int, got float 1.5"


def test_set_arguments():
    assert parse_set_args(["a.b=1", "c=x=y", "a.b=2"]) == {"a.b": "2", "c": "x=y"}
    assert parse_set_args(["output.dir="]) == {"output.dir": ""}
    for bad in ["target.opset", "=3"]:
        with pytest.raises(ConfigError, match=re.escape("expected KEY=VALUE")):
            parse_set_args([bad])


def test_flags_still_win_over_set():
    from memc.cli import _config, build_parser

    args = build_parser().parse_args(["compile", "m:f", "--set", "seed=3", "--seed", "9", "--set", "target.opset=20"])
    cfg = _config(args)
    assert cfg.seed == 9 and cfg.target.opset == 20


def test_inspect_takes_set_too():
    from memc.cli import _config, build_parser

    assert _config(build_parser().parse_args(["inspect", "m:f", "--set", "inputs.seq_len=8"])).inputs.seq_len == 8


def test_api_rejects_non_mapping_and_non_string_keys():
    with pytest.raises(ConfigError, match="expected a dict"):
        apply_overrides(ToolchainConfig(), ["target.opset=21"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="override keys are strings"):
        apply_overrides(ToolchainConfig(), {3: 1})


# -- pipeline entries: the keys are the pass's options ---------------------------------------------------------------


@dataclasses.dataclass
class WindowOptions:
    window: int = option(32, "an int option")
    mode: Literal["fast", "exact"] = option("exact", "a choice")
    scale: float = option(1.0, "a float")
    layers: list[int] = option(factory=list, doc="a list")

    def validate(self) -> None:
        if self.window < 1:
            raise ValueError("window must be >= 1")


class WindowPass(Pass):
    """Does nothing; has typed options."""

    Config = WindowOptions

    def run(self, program, ctx):
        return PassResult(program, False)


@pytest.fixture
def window_pass():
    name = f"test-window-{uuid.uuid4().hex[:8]}"
    cls = register_pass(type("RegisteredWindow", (WindowPass,), {"name": name}))
    yield name, cls
    passes_base._REGISTRY.pop(name, None)
    passes_base._ORIGINS.pop(name, None)


def test_pass_options_are_typed_by_the_pass_config(window_pass):
    name, _ = window_pass
    base = parse_config({"pipeline": [{"pass": "eliminate-dead-code"}, {"pass": name, "mode": "fast"}]})
    cfg = apply_overrides(base, {"pipeline.1.window": "64", "pipeline.1.layers": "[0, 2]", "pipeline[1].scale": "2"},
                          origin="--set", from_text=True)
    assert cfg.pipeline[1].options == {"mode": "fast", "window": 64, "layers": [0, 2], "scale": 2.0}
    assert apply_overrides(base, {"pipeline.1.window": 64, "pipeline.1.layers": [0, 2], "pipeline.1.scale": 2}) == cfg
    assert base.pipeline[1].options == {"mode": "fast"}
    assert _err(base, {"pipeline.1.windw": "64"}, origin="--set", from_text=True).startswith(
        "--set pipeline[1].windw: unknown key. did you mean 'window'? Valid keys here: layers, mode, scale, window"
    )
    assert _err(base, {"pipeline.1.mode": "slow"}, origin="--set", from_text=True) == (
        "--set pipeline[1].mode: 'slow' is not one of 'fast', 'exact'"
    )
    assert _err(base, {"pipeline.1.window": "wide"}, origin="--set", from_text=True) == (
        "--set pipeline[1].window: expected int, got str 'wide'"
    )


def test_pipeline_pass_name_and_whole_entries(window_pass):
    name, _ = window_pass
    base = parse_config({"pipeline": [{"pass": "eliminate-dead-code"}]})
    cfg = apply_overrides(base, {"pipeline.0.pass": name}, from_text=True)
    assert cfg.pipeline[0].name == name
    cfg = apply_overrides(base, {"pipeline": f'[{{pass = "{name}", window = 8}}, {{pass = "eliminate-dead-code"}}]'},
                          from_text=True)
    assert [s.name for s in cfg.pipeline] == [name, "eliminate-dead-code"] and cfg.pipeline[0].options == {"window": 8}
    msg = _err(base, {"pipeline.0.pass": "eliminate-dead-cod", "pipeline.0.x": 1})
    assert "pipeline[0].pass: unknown pass 'eliminate-dead-cod'" in msg and "did you mean 'eliminate-dead-code'" in msg


def test_unregistered_pass_instance_options():
    mine = WindowPass(WindowOptions(window=4))
    mine.name = "my-window"  # an unregistered build-script pass
    base = parse_config({"pipeline": [{"pass": "eliminate-dead-code"}, mine]})
    assert base.pipeline[1].instance is mine and base.pipeline[1].options["window"] == 4
    cfg = apply_overrides(base, {"pipeline.1.window": "16"}, origin="--set", from_text=True)
    changed = cfg.pipeline[1].instance
    assert isinstance(changed, WindowPass) and changed is not mine and changed.config.window == 16
    assert mine.config.window == 4, "the caller's pass object keeps its options"
    assert cfg.pipeline[1].options["window"] == 16
    assert apply_overrides(base, {"seed": 1}).pipeline[1].instance is mine, "untouched instances are kept as they are"
    msg = _err(base, {"pipeline.1.window": 0})
    assert msg.startswith("pipeline[1]: window must be >= 1"), msg
    msg = _err(base, {"pipeline.1.windows": 1})
    assert msg.startswith("override pipeline[1].windows: unknown key. did you mean 'window'?"), msg


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _admits_text(tp: Any) -> bool:
    return tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)))


def test_every_registered_pass_option_roundtrips_from_text():
    """Every option of every registered pass (plugins included) is reachable by --set with its default value."""
    walked = 0
    for name, cls in registered_passes().items():
        hints = get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue  # required options have no value to round-trip
            if default is None:
                continue  # TOML has no null
            default = to_dict(default)
            text = default if _admits_text(hints[f.name]) else _toml_value(default)
            base = parse_config({"pipeline": [{"pass": name}]})
            cfg = apply_overrides(base, {f"pipeline.0.{f.name}": text}, origin="--set", from_text=True)
            assert cfg.pipeline[0].options[f.name] == default, (name, f.name)
            walked += 1
    print(f"walked {walked} pass options of {len(registered_passes())} registered passes")


# -- the command line ------------------------------------------------------------------------------------------------


def test_cli_set_reaches_the_plan(tmp_path):
    res = run_cli(["compile", "tests.fixtures.handwritten:mha_model", "-o", tmp_path / "out", "--dry-run",
                   "--set", "target.opset=21", "--set", "seed=5", "--set", "target.decode_graph=false"])
    assert res.rc == 0, res.stderr
    assert "seed:    5" in res.stdout and "target:  onnx (opset 21" in res.stdout


@pytest.mark.parametrize(
    "item, needles",
    [
        ("target.opsett=21", ["memc: error: --set target.opsett: unknown key", "did you mean 'opset'"]),
        ("target.opset=twenty", ["memc: error: --set target.opset: expected int, got str 'twenty'"]),
        ("model.kind=onnx", ["--set model.kind: 'onnx' is not one of 'auto', 'pt2', 'hf', 'factory', 'pickle'"]),
        ("target.opset", ["memc: error: --set 'target.opset': expected KEY=VALUE"]),
    ],
)
def test_cli_set_errors_are_one_message(tmp_path, item, needles):
    res = run_cli(["compile", "tests.fixtures.handwritten:mha_model", "-o", tmp_path / "out", "--set", item])
    assert res.rc == 2
    assert "Traceback" not in res.stderr and res.stderr.count("memc: error:") == 1, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
