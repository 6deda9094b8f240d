"""Third-party passes: the example plugin examples/memc-fold-constants, installed with pip and used through memc.

The package is pip-installed into the interpreter running the tests; every memc run afterwards is a fresh
subprocess, so the ``memc.passes`` entry point is discovered the way a user's installation discovers it (the test
process itself may already have loaded its plugin list). The install is made from a temporary copy of the example
so setuptools' build/ and *.egg-info never land in the repository.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "memc-fold-constants"
TIMEOUT = 900

FOLD_TOML = """\
[inputs]
batch = 2
seq_len = 16

[instruments]
progress = false

[[pipeline]]
pass = "fold-constants"
max_bytes = 1048576

[[pipeline]]
pass = "eliminate-dead-code"
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=str(cwd), env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT
    )


def _memc(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "memc", *map(str, args)], cwd)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def plugin_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/memc-fold-constants pip-installed into this interpreter; returns the copy it was installed from."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip(
            f"pip is not installed in {sys.executable}: this test installs examples/memc-fold-constants "
            "with `python -m pip install --no-build-isolation --no-deps`"
        )
    copy = tmp_path_factory.mktemp("plugin") / EXAMPLE.name
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "out", ".pytest_cache"))
    proc = _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", str(copy)], copy)
    assert proc.returncode == 0, "pip install of the example plugin failed\n" + _explain(proc)
    return copy


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers", reason="the tiny Llama is built with transformers (memc[hf])")
    import torch

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama") / "llama"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def _pass_record(report: dict, name: str) -> dict:
    records = [r for r in report["passes"] if r["name"] == name]
    assert len(records) == 1, f"expected one {name!r} record in report.json, got {report['passes']}"
    return records[0]


def test_memc_passes_lists_the_plugin_with_its_options_and_origin(plugin_copy, tmp_path):
    proc = _memc("passes", cwd=tmp_path)
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout
    assert "fold-constants  (plugin memc-fold-constants)" in out
    assert "Evaluate subgraphs that depend only on weights and literals once" in out
    assert "max_bytes: int = 67108864  largest folded result kept as a new constant" in out
    assert re.search(r"skip_ops: list\[str\] = \[\]  ops never folded", out), out
    assert "eliminate-dead-code  (memc.passes.cleanup)" in out  # built-ins are still there
    assert "failed to load" not in out + proc.stderr


def test_compile_tiny_llama_runs_the_plugin_pass(plugin_copy, tiny_llama, tmp_path):
    toml = tmp_path / "toolchain_with_fold.toml"
    toml.write_text(FOLD_TOML, encoding="utf-8")
    out = tmp_path / "out"

    proc = _memc("compile", tiny_llama, "-c", toml, "-o", out, "--no-progress", cwd=tmp_path)

    assert proc.returncode == 0, _explain(proc)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    fold = _pass_record(report, "fold-constants")
    assert fold["changed"] is True
    assert fold["options"] == {"max_bytes": 1048576, "skip_ops": []}
    metrics = fold["metrics"]
    # the rotary embedding's inv_freq.to(float32) is a no-op cast of a buffer: folded onto the buffer itself
    assert metrics["nodes_folded"] >= 1 and metrics["constants_reused"] >= 1
    assert {"constants_created", "bytes_created", "bytes_freed", "skipped_over_max_bytes"} <= set(metrics)
    assert metrics["verify_max_abs_diff"] == 0.0  # the per-pass check ran and the fold is exact
    assert [r["name"] for r in report["passes"]] == ["fold-constants", "eliminate-dead-code"]
    assert report["compiled"]["graph_nodes"] < report["capture"]["graph_nodes"]
    assert report["verification"]["passed"] is True
    assert "pass fold-constants" in (out / "summary.txt").read_text(encoding="utf-8")


def test_compile_handwritten_model_folds_its_weight_transposes(plugin_copy, tmp_path):
    """The example's demo model, compiled the way its README says (from the example directory)."""
    out = tmp_path / "out"

    proc = _memc("compile", "demo_model:build", "-c", "toolchain-fold.toml", "-o", out, "--no-progress", cwd=plugin_copy)

    assert proc.returncode == 0, _explain(proc)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    metrics = _pass_record(report, "fold-constants")["metrics"]
    # w_in.t() * log_scale.exp()[:, None] (t, exp, unsqueeze, mul) and w_out.t(): two constants of 256x64 floats
    assert (metrics["nodes_folded"], metrics["constants_created"], metrics["bytes_created"]) == (5, 2, 2 * 256 * 64 * 4)
    assert metrics["bytes_freed"] == report["capture"]["parameter_bytes"]  # w_in, log_scale, w_out all gone
    # the folded weights are constants now (buffers), not trainable parameters
    assert (report["compiled"]["parameter_bytes"], report["compiled"]["buffer_bytes"]) == (0, 2 * 256 * 64 * 4)
    assert report["verification"]["passed"] is True


def test_the_plugins_own_tests_pass():
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")], EXAMPLE)
    assert proc.returncode == 0, "examples/memc-fold-constants/tests failed\n" + _explain(proc)
