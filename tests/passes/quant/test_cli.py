"""The user surface: toolchains/mixed-bits.toml, `memc compile --budget`, calibration text, bad input (exit 2)."""
from __future__ import annotations

import pytest

from memc.calibration import calibration_text
from memc.errors import ConfigError
from tests.helpers import REPO_ROOT, run_cli, write_toml

MIXED = REPO_ROOT / "toolchains" / "mixed-bits.toml"


def test_budget_reaches_the_allocation_pass(tiny_llama_dir, tmp_path):
    rc, out, err = run_cli(["compile", tiny_llama_dir, "-c", MIXED, "--budget", "1.6MB", "--dry-run", "-o", tmp_path / "o"])
    assert rc == 0, err
    assert "quant-sensitivity" in out and "quantize" in out
    assert "allocate-bits (budget='1.6MB'" in out


@pytest.mark.parametrize("args, message", [
    (["--budget", "1.6MB"], "--budget: the default pipeline has no allocate-bits pass"),
    (["-c", MIXED, "--budget", "lots"], "pipeline[1]: budget: cannot read budget 'lots'"),
    (["-c", MIXED, "--budget", "2 parsecs"], "unknown budget unit 'parsecs'"),
])
def test_bad_budget(tiny_llama_dir, tmp_path, args, message):
    rc, out, err = run_cli(["compile", tiny_llama_dir, *args, "--dry-run", "-o", tmp_path / "o"])
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_unknown_format_names_the_key(tiny_llama_dir, tmp_path):
    cfg = write_toml(tmp_path / "t.toml", """
        [[pipeline]]
        pass = "quant-sensitivity"
        candidates = ["int4-g128", "int4-gX"]
    """)
    rc, out, err = run_cli(["compile", tiny_llama_dir, "-c", cfg, "--dry-run", "-o", tmp_path / "o"])
    assert rc == 2 and "pipeline[0]: candidates[1]: unknown format 'int4-gX'" in err, err


def test_calibration_text_sources(tmp_path):
    with pytest.raises(ConfigError, match="held-out evaluation text"):
        calibration_text("heldout:code")
    with pytest.raises(ConfigError, match="unknown corpus"):
        calibration_text("trainsplit:poetry")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        calibration_text(str(empty))
    from memc.reference import corpus

    doc = max(corpus.split("code", True), key=lambda d: len(d.data))
    leaked = tmp_path / "leak.txt"
    leaked.write_bytes(b"# my notes\n" + doc.data)
    with pytest.raises(ConfigError, match="held-out code text"):
        calibration_text(str(leaked))
    own = tmp_path / "own.txt"
    own.write_text("def mine():\n    return 42\n" * 20)
    assert calibration_text(str(own)).startswith("def mine")
    assert len(calibration_text("trainsplit:prose")) > 100_000


def test_compile_with_budget_fits_and_predicts_the_file(tiny_llama_dir, tmp_path):
    """End to end: sensitivity (graph bytes measured by a trial lowering) -> ILP -> GPTQ -> onnx, verified against the
    torch program; model.onnx is within the budget and within 1% of the predicted bytes."""
    cfg = write_toml(tmp_path / "t.toml", f"""
        [inputs]
        seq_len = 16
        [calibration]
        num_samples = 2
        [[pipeline]]
        pass = "quant-sensitivity"
        candidates = ["int2-g16", "int4-g16", "int8-g32", "keep"]
        cache_dir = "{tmp_path / 'cache'}"
        [[pipeline]]
        pass = "allocate-bits"
        [[pipeline]]
        pass = "quantize"
        method = "gptq"
    """)
    budget = 104_000  # between all-int2 (~98 KB with the graph) and all-int4 (~107 KB): a real mix
    rc, out, err = run_cli(["compile", tiny_llama_dir, "-c", cfg, "--budget", str(budget), "-o", tmp_path / "o",
                            "--no-progress"])
    assert rc == 0, err
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    alloc = next(p for p in report["passes"] if p["name"] == "allocate-bits")["metrics"]
    size = (tmp_path / "o" / "model.onnx").stat().st_size
    assert size <= budget
    assert abs(size - alloc["predicted_bytes"]) <= 0.01 * alloc["predicted_bytes"], (size, alloc["predicted_bytes"])
    assert len(alloc["formats"]) >= 2, alloc["formats"]
