"""toolchain.toml -> typed config. Every key is validated; errors name the exact key path and the valid choices.

The pipeline is an ordered array of tables, one per pass:

    [[pipeline]]
    pass = "eliminate-dead-code"     # a registered pass name (built-in or plugin)
    # ...that pass's own options, validated against its Config dataclass

Pass options are validated when the pipeline is resolved against the registry (``resolve_pipeline``), so unknown
pass names and option typos fail before anything is loaded or written.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memc.errors import ConfigError
from memc.schema import from_dict, option, to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DType = Literal["float32", "float16", "bfloat16", "int64", "int32", "bool"]


@dataclass
class TensorSpec:
    """One model input, for models whose inputs memc cannot infer (factories, pickles)."""

    name: str = option(doc="the forward() argument name")
    shape: list[int] = option(doc="example shape; use >= 2 on an axis that should stay dynamic")
    dtype: DType = option("float32", "element type")
    dynamic: dict[str, str] = option(factory=dict, doc='axis -> dimension name, e.g. {0 = "batch", 1 = "seq"}')
    high: int = option(0, "integer inputs are drawn from [0, high); 0 means 2")

    def validate(self) -> None:
        for axis in self.dynamic:
            if not axis.isdigit() or int(axis) >= len(self.shape):
                raise ValueError(f"dynamic axis {axis!r} of input {self.name!r} is not an axis of shape {self.shape}")


@dataclass
class ModelConfig:
    source: str = option("", "model path or package.module:function; the CLI's MODEL argument overrides it")
    kind: Literal["auto", "pt2", "hf", "factory", "pickle"] = option("auto", "how to load the source")
    task: Literal["auto", "causal-lm", "encoder"] = option("auto", "HF models: what the captured graph returns")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "weights dtype for capture")


@dataclass
class InputsConfig:
    batch: int = option(2, "example batch size (>= 2 keeps the batch axis dynamic)")
    seq_len: int = option(32, "example sequence length for token models")
    dynamic_batch: bool = option(True, "export with a dynamic batch axis")
    dynamic_seq: bool = option(True, "export with a dynamic sequence axis (token models)")
    max_seq_len: int = option(0, "upper bound of the dynamic sequence axis; 0 = the model's own maximum")
    tensors: list[TensorSpec] = option(factory=list, doc="explicit inputs (factories / pickles)")

    def validate(self) -> None:
        if self.batch < 1 or self.seq_len < 1:
            raise ValueError("batch and seq_len must be >= 1")
        if self.dynamic_batch and self.batch < 2:
            raise ValueError("a dynamic batch axis needs an example batch >= 2 (torch.export specialises 0/1)")


@dataclass
class CalibrationConfig:
    source: str = option(
        "random", '"random" token/tensor samples, "trainsplit:code" / "trainsplit:prose" (the reference corpus\'s train split), '
        "or a path to a UTF-8 text file (held-out text is refused)"
    )
    tokenizer: Literal["auto", "bytes", "hf"] = option(
        "auto", "text -> tokens: the HF model directory's tokenizer, or raw bytes (byte-level models)"
    )
    num_samples: int = option(2, "calibration / verification samples")
    seq_len: int = option(0, "tokens per sample; 0 = inputs.seq_len")

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")


@dataclass
class InstrumentsConfig:
    verify_each_pass: bool = option(True, "compare each pass's output with the program before it")
    pass_atol: float = option(1e-4, "absolute tolerance of per-pass verification (passes meant to be exact)")
    dump_ir: bool = option(False, "write the graph after each pass to <output>/ir/")
    progress: bool = option(True, "show a progress display on the terminal")


@dataclass
class ExpertCacheConfig:
    slots: int = option(
        0, "MoE models: also write expert_cache/, the model run with this many experts per MoE layer resident in "
           "slots and the others loaded on demand from a memory-mapped store (exact; k <= slots <= experts); 0 = off",
    )

    def validate(self) -> None:
        if self.slots < 0:
            raise ValueError(f"slots must be >= 0 (0 = no expert cache), got {self.slots}")


@dataclass
class TargetConfig:
    name: Literal["onnx"] = option("onnx", "deployment target (onnx: ONNX run and verified with onnxruntime)")
    opset: int = option(23, "ONNX opset version (18..23); 23 emits native Attention / RotaryEmbedding / RMSNormalization")
    atol: float = option(1e-4, "max |Δ| allowed between the artifact and the torch program, per output")
    verify_shapes: list[list[int]] = option(
        factory=lambda: [[1, 7]], doc="extra [batch, seq] shapes to verify dynamic axes with (token models)"
    )
    optimize: bool = option(True, "run the ONNX exporter's graph optimizer (constant folding, CSE)")
    debug_metadata: bool = option(False, "keep the exporter's node metadata and value_info (machine paths; larger file)")
    decode_graph: bool = option(
        False,
        "causal LMs: also write decode.onnx, the stateful decode graph of the program after its passes (input_ids + "
        "past state -> logits + present state: KV caches, memory-caching states; memc.runtime.DecodeEngine runs it), "
        "verified as prefill + one-token steps against the program's full-sequence logits and by greedy tokens",
    )
    expert_cache: ExpertCacheConfig = option(
        factory=ExpertCacheConfig, doc="the expert-cache form of an MoE model (memc.runtime.ExpertCacheEngine): "
        "segment graphs cut at the routers, experts graphs over slot buffers, a store of expert records",
    )
    decode_steps: int = option(64, "decode_graph: greedy tokens (and prefill + as many steps of logits) compared with "
                                   "the torch program's (capped by context)")

    def validate(self) -> None:
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if not 18 <= self.opset <= 23:
            raise ValueError(f"opset {self.opset} is outside the supported range 18..23")
        for shape in self.verify_shapes:
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"verify_shapes entries are [batch, seq] with both >= 1, got {shape}")


@dataclass
class OutputConfig:
    dir: str = option("memc-out", "output directory (replaced atomically; must not be a non-memc directory)")
    hf_checkpoint: bool = option(
        False,
        "Hugging Face sources: also write hf/, a transformers-loadable checkpoint of the compiled weights (the expert "
        "count updated after uniform expert pruning), verified against the program",
    )


@dataclass
class PassSpec:
    """One pipeline entry: a pass name and its raw options (validated by ``resolve_pipeline``), or, from the Python
    API, a ready Pass instance (a build script's own pass, registered or not; ``options`` then mirror its config)."""

    name: str
    options: dict[str, Any]
    path: str  # key path in the config, for errors
    instance: Any = None  # memc.passes.base.Pass


@dataclass
class ToolchainConfig:
    seed: int = option(0, "seeds torch / numpy / random; recorded in report.json")
    model: ModelConfig = option(factory=ModelConfig, doc="what to compile")
    inputs: InputsConfig = option(factory=InputsConfig, doc="example inputs and dynamic axes")
    calibration: CalibrationConfig = option(factory=CalibrationConfig, doc="sample data for passes and checks")
    instruments: InstrumentsConfig = option(factory=InstrumentsConfig, doc="pass instrumentation")
    target: TargetConfig = option(factory=TargetConfig, doc="where the artifact runs")
    output: OutputConfig = option(factory=OutputConfig, doc="where artifacts go")
    pipeline: list[PassSpec] = field(default_factory=list)


def parse_config(data: dict[str, Any], origin: str = "toolchain.toml") -> ToolchainConfig:
    """Validate a parsed TOML mapping; pipeline entries keep their raw options for the registry to check."""
    raw_pipeline = data.get("pipeline", [])
    if not isinstance(raw_pipeline, list):
        raise ConfigError(f"pipeline: expected an array of tables ([[pipeline]]), got {type(raw_pipeline).__name__}")
    specs = []
    for i, entry in enumerate(raw_pipeline):
        path = f"pipeline[{i}]"
        if not isinstance(entry, dict):
            specs.append(_instance_spec(entry, path))
            continue
        name = entry.get("pass")
        if not isinstance(name, str):
            raise ConfigError(f"{path}.pass: required string naming a registered pass (see `memc passes`)")
        specs.append(PassSpec(name, {k: v for k, v in entry.items() if k != "pass"}, path))
    cfg = from_dict(ToolchainConfig, {k: v for k, v in data.items() if k != "pipeline"}, "")
    cfg.pipeline = specs
    return cfg


def _instance_spec(entry: Any, path: str) -> PassSpec:
    """A Pass object in a pipeline given from Python; anything else that is not a table is an error."""
    base = sys.modules.get("memc.passes.base")  # no Pass object can exist unless that module was imported
    Pass = base.Pass if base is not None else None
    if Pass is not None and isinstance(entry, type) and issubclass(entry, Pass):
        raise ConfigError(f"{path}: got the Pass class {entry.__qualname__}; give an instance, {entry.__qualname__}()")
    if Pass is None or not isinstance(entry, Pass):
        what = f"{type(entry).__name__} {entry!r}" if isinstance(entry, (str, int, float, bool)) else type(entry).__name__
        raise ConfigError(
            f"{path}: expected a table with a 'pass' key, or an instance of a memc.passes.Pass subclass, got {what}"
        )
    cls = type(entry)
    name = getattr(entry, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: {cls.__qualname__} must define a non-empty class attribute 'name'")
    if not dataclasses.is_dataclass(cls.Config) or not isinstance(entry.config, cls.Config):
        raise ConfigError(
            f"{path}: {cls.__qualname__}().config is a {type(entry.config).__name__}, expected a "
            f"{cls.__qualname__}.Config dataclass instance"
        )
    return PassSpec(name, to_dict(entry.config), path, entry)


def config_data(cfg: ToolchainConfig) -> dict[str, Any]:
    """The plain-data form of a config (what ``parse_config`` reads back): pipeline entries as tables, Pass
    instances as themselves."""
    data = to_dict(cfg)
    data["pipeline"] = [s.instance if s.instance is not None else {"pass": s.name, **s.options} for s in cfg.pipeline]
    return data


def load_config(path: str | Path | None) -> ToolchainConfig:
    """Read toolchain.toml; ``None`` gives the defaults (an empty pipeline that only captures and lowers)."""
    if path is None:
        return ToolchainConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    return parse_config(data, str(p))
