"""Plain helpers shared by memc's tests (fixtures that wrap them live in tests/conftest.py).

Import them from any test file with ``from tests.helpers import run_cli, ...`` (``tests`` is a package and pytest puts
the repository root on ``sys.path``).

* Running memc: ``run_cli`` calls ``memc.cli.main`` in-process (fast, no interpreter start-up); ``run_memc``
  runs the real ``memc`` console script in a subprocess (end-to-end: entry point, environment, exit code).
  ``compile_model`` wraps ``memc compile`` and loads ``report.json``.
* Tiny Hugging Face models: ``TINY_FAMILIES`` names one tiny config of each real transformers architecture that
  memc supports; ``save_tiny_hf`` writes one with ``save_pretrained`` (safetensors), ``load_hf_original`` loads it
  back the way a user would, independently of memc's loader.
* ONNX: ``run_onnx`` runs an ONNX file in onnxruntime; ``max_abs_diff`` compares it with torch outputs.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ATOL = 1e-4  # memc's default target tolerance, also what the independent checks hold artifacts to

# max |Δ| numbers measured by tests, printed in pytest's terminal summary (see conftest.pytest_terminal_summary)
RECORDED_DIFFS: dict[str, float] = {}


def record_diff(label: str, value: float) -> None:
    """Remember a measured max |Δ| under ``label`` and print it (visible with ``pytest -s``)."""
    RECORDED_DIFFS[label] = max(value, RECORDED_DIFFS.get(label, 0.0))
    print(f"{label} max|Δ|={value:.3g}")


# ---------------------------------------------------------------------------------------------------------------
# Running memc
# ---------------------------------------------------------------------------------------------------------------
class CliResult(NamedTuple):
    """What one memc invocation returned; unpacks as ``rc, stdout, stderr``."""

    rc: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _patched_env(env: dict[str, str | None]) -> Any:
    old = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _chdir(path: Path) -> Any:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli(args: Sequence[Any], cwd: str | Path | None = None, env: dict[str, str | None] | None = None) -> CliResult:
    """Run ``memc <args>`` in this process via ``memc.cli.main`` and capture what it printed.

    ``cwd`` defaults to the repository root (so ``tests.fixtures.handwritten:mha_model`` resolves); it is restored
    afterwards. ``env`` temporarily sets (or, with None, removes) environment variables. ``COLUMNS`` is 200 unless
    ``env`` says otherwise, so rich tables are not truncated in captured output. argparse's ``SystemExit`` (usage
    errors, ``--help``) is turned into its exit code.
    """
    from memc.cli import main

    out, err = io.StringIO(), io.StringIO()
    env = {"COLUMNS": "200", **(env or {})}
    with _patched_env(env), _chdir(Path(cwd) if cwd is not None else REPO_ROOT):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return CliResult(int(rc), out.getvalue(), err.getvalue())


def memc_command() -> list[str]:
    """The installed ``memc`` console script (next to this interpreter, else on PATH); ``python -m memc`` last."""
    script = Path(sys.executable).with_name("memc")
    if script.is_file():
        return [str(script)]
    found = shutil.which("memc")
    return [found] if found else [sys.executable, "-m", "memc"]


def run_memc(
    args: Sequence[Any], cwd: str | Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> CliResult:
    """Run the real ``memc`` console script in a subprocess (end-to-end tests). ``cwd`` defaults to the repo root."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        memc_command() + [str(a) for a in args],
        cwd=str(cwd) if cwd is not None else str(REPO_ROOT),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class CompileResult:
    """``memc compile`` outcome: exit code, output, the output directory and its parsed report.json (or None)."""

    rc: int
    stdout: str
    stderr: str
    out_dir: Path
    report: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def onnx_path(self) -> Path:
        return self.out_dir / "model.onnx"

    def explain(self) -> str:
        """For assertion messages: the exit code and the tail of stderr."""
        return f"memc compile exited {self.rc}\n--- stderr (tail) ---\n{self.stderr[-3000:]}"


def compile_model(
    model: str | Path,
    out_dir: str | Path,
    *extra: Any,
    cwd: str | Path | None = None,
    subprocess_: bool = False,
) -> CompileResult:
    """``memc compile MODEL -o OUT_DIR --no-progress *extra``, in-process (default) or via the console script."""
    args = ["compile", str(model), "-o", str(out_dir), "--no-progress", *extra]
    rc, stdout, stderr = run_memc(args, cwd=cwd) if subprocess_ else run_cli(args, cwd=cwd)
    out = Path(out_dir)
    if not out.is_absolute():
        out = Path(cwd if cwd is not None else REPO_ROOT) / out
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if rc == 0 and report_path.is_file() else None
    return CompileResult(rc, stdout, stderr, out, report)


# memory-caching options of the session's ``mc_compiled`` fixture: segments close, fill the cap and merge within
# 24 tokens, so a short sequence exercises every part of the bounded state
_CAPTURED: dict[tuple[str, str], Any] = {}


def captured(source: Any, cfg: Any = None) -> Any:
    """``memc.capture.capture(str(source), cfg)`` once per process for the same source and config (a capture is a
    torch.export, seconds each), returned as a fresh Program: its own copy of the module, no annotations, no log."""
    import copy

    from memc.capture import capture
    from memc.config import ToolchainConfig

    cfg = cfg if cfg is not None else ToolchainConfig()
    key = (str(source), repr(cfg))
    if key not in _CAPTURED:
        _CAPTURED[key] = capture(str(source), cfg)
    p = _CAPTURED[key]
    return p.replace(module=copy.deepcopy(p.module), annotations={}, log=[])


MC_OPTIONS = {"window": 4, "segment": 4, "max_segments": 2}


def mc_toolchain(path: Path, decode_steps: int = 16) -> Path:
    """A toolchain.toml: detect-attention + memory-caching (MC_OPTIONS), opset 18, with a decode graph."""
    return write_toml(path, f"""
        [[pipeline]]
        pass = "detect-attention"

        [[pipeline]]
        pass = "memory-caching"
        window = {MC_OPTIONS["window"]}
        segment = {MC_OPTIONS["segment"]}
        max_segments = {MC_OPTIONS["max_segments"]}

        [target]
        opset = 18
        decode_graph = true
        decode_steps = {decode_steps}
    """)


def write_toml(path: Path, text: str) -> Path:
    """Write a toolchain.toml (dedented) and return its path."""
    import textwrap

    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tiny Hugging Face models of real architectures
# ---------------------------------------------------------------------------------------------------------------
VOCAB = 128
HIDDEN = 32
LAYERS = 2
MAX_POS = 128
# transformers' default init (std 0.02) gives near-constant logits and near-uniform routers; a larger std makes
# attention, routing and logits non-trivial so a numerical error cannot hide under a tiny output scale.
INIT_STD = 0.2


@dataclass(frozen=True)
class TinyFamily:
    """A tiny config of a real transformers architecture: ``make()`` returns (config, model class)."""

    name: str
    make: Callable[[], tuple[Any, type]]
    task: str  # causal-lm | encoder
    moe: bool = False


def _decoder_kwargs() -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        initializer_range=INIT_STD,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _llama():
    import transformers as T

    # tied embeddings: `memc inspect` must count the shared weight once
    return T.LlamaConfig(**_decoder_kwargs(), tie_word_embeddings=True), T.LlamaForCausalLM


def _qwen2():
    import transformers as T

    return T.Qwen2Config(**_decoder_kwargs(), tie_word_embeddings=False), T.Qwen2ForCausalLM


def _gpt2():
    import transformers as T

    cfg = T.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=MAX_POS,
        initializer_range=INIT_STD, bos_token_id=None, eos_token_id=None,
    )
    return cfg, T.GPT2LMHeadModel


def _mixtral():
    import transformers as T

    return T.MixtralConfig(**_decoder_kwargs(), num_local_experts=4, num_experts_per_tok=2), T.MixtralForCausalLM


def _qwen2_moe():
    import transformers as T

    cfg = T.Qwen2MoeConfig(
        **_decoder_kwargs(), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, decoder_sparse_step=1,
    )
    return cfg, T.Qwen2MoeForCausalLM


def _olmoe():
    import transformers as T

    return T.OlmoeConfig(**_decoder_kwargs(), num_experts=4, num_experts_per_tok=2), T.OlmoeForCausalLM


def _qwen3_moe():
    import transformers as T

    # norm_topk_prob=False: the non-renormalised router (Qwen3-MoE's default), which slicing must still keep exact
    cfg = T.Qwen3MoeConfig(**_decoder_kwargs(), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8)
    return cfg, T.Qwen3MoeForCausalLM


def _deepseek_v3():
    import transformers as T

    kw = {**_decoder_kwargs(), "num_key_value_heads": 4}
    cfg = T.DeepseekV3Config(
        **kw, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, moe_intermediate_size=16, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
    )
    return cfg, T.DeepseekV3ForCausalLM


def _gpt_oss():
    import transformers as T

    kw = {**_decoder_kwargs(), "intermediate_size": 32}
    cfg = T.GptOssConfig(
        **kw, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return cfg, T.GptOssForCausalLM


def _bert():
    import transformers as T

    cfg = T.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_POS, initializer_range=INIT_STD, pad_token_id=0,
    )
    return cfg, T.BertModel


TINY_FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily("llama", _llama, "causal-lm"),
        TinyFamily("qwen2", _qwen2, "causal-lm"),
        TinyFamily("gpt2", _gpt2, "causal-lm"),
        TinyFamily("mixtral", _mixtral, "causal-lm", moe=True),
        TinyFamily("qwen2-moe", _qwen2_moe, "causal-lm", moe=True),
        TinyFamily("olmoe", _olmoe, "causal-lm", moe=True),
        TinyFamily("bert", _bert, "encoder"),
    )
}

# MoE families with their own routing quirks, used by the MoE pass tests only (tests/passes/moe): Qwen3-MoE without
# renormalisation, DeepSeek-V3 (sigmoid + correction bias + groups + shared expert + a dense first layer) and GPT-OSS
# (router bias, top-k before softmax, interleaved clamped SwiGLU, no sdpa: captured with eager attention).
MOE_FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily("qwen3-moe", _qwen3_moe, "causal-lm", moe=True),
        TinyFamily("deepseek-v3", _deepseek_v3, "causal-lm", moe=True),
        TinyFamily("gpt-oss", _gpt_oss, "causal-lm", moe=True),
    )
}
ALL_FAMILIES: dict[str, TinyFamily] = {**TINY_FAMILIES, **MOE_FAMILIES}


def save_tiny_hf(name: str, directory: Path, seed: int = 0) -> Path:
    """Build ALL_FAMILIES[name] with a fixed seed and ``save_pretrained`` it (safetensors) into ``directory``."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config, cls = ALL_FAMILIES[name].make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_hf_original(directory: Path, moe: bool | None = None) -> torch.nn.Module:
    """The saved model as a user would load it with transformers, independently of memc: float32, sdpa attention
    (eager where the architecture has none),
    MoE experts with ``experts_implementation="batched_mm"`` (the implementation memc captures)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    cls = getattr(transformers, config.architectures[0])
    if moe is None:
        moe = any(getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    attention = "eager" if getattr(cls, "_supports_sdpa", True) is False else "sdpa"  # GPT-OSS has no sdpa
    kwargs: dict[str, Any] = {"attn_implementation": attention, "dtype": torch.float32, "local_files_only": True}
    if moe:
        kwargs["experts_implementation"] = "batched_mm"
    return cls.from_pretrained(directory, **kwargs).eval()


def token_batch(batch: int, seq: int, vocab: int = VOCAB, seed: int = 1234, pad: Iterable[int] = ()) -> dict:
    """Fresh ``input_ids`` and an ``attention_mask`` whose rows are right-padded by the amounts in ``pad``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for row, n in enumerate(pad):
        if n:
            mask[row, seq - n :] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------------------------
# ONNX / onnxruntime
# ---------------------------------------------------------------------------------------------------------------
def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session: Any, feeds: dict[str, Any]) -> list[np.ndarray]:
    """Run an ONNX model in onnxruntime; ``feeds`` maps input names to tensors or arrays. Every graph input must be
    fed (a missing or extra name fails here rather than inside onnxruntime)."""
    sess = ort_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    names = [i.name for i in sess.get_inputs()]
    assert sorted(names) == sorted(feeds), f"ONNX inputs {names} != fed {sorted(feeds)}"
    arrays = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in feeds.items()}
    return sess.run(None, arrays)


def onnx_input_dims(path: Path) -> dict[str, list[int | str]]:
    """Input name -> shape, with symbolic dimensions as their names (``dim_param``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        i.name: [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }


def max_abs_diff(expected: Any, actual: Any) -> float:
    """max |expected - actual| in float64; shapes must match."""
    e = expected.detach().cpu().to(torch.float64).numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected, np.float64)
    a = actual.detach().cpu().to(torch.float64).numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    assert e.shape == a.shape, f"shape mismatch: expected {e.shape}, got {a.shape}"
    return float(np.max(np.abs(e - a))) if e.size else 0.0
