"""`memc routing` on the command line: a tiny byte-level Qwen3-MoE prints the tables and writes JSON and a PNG;
every bad input is one `memc: error:` line (and at most a hint) with exit code 2, no traceback, nothing written."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from memc.passes.base import PassContext
from memc.passes.moe.calibrate import CALIBRATION_KEY, CalibrateOptions, MoECalibrate
from memc.passes.moe.detect import DetectMoE
from tests.helpers import captured, run_cli

EXPERTS, TOP_K = 8, 2


@pytest.fixture(scope="module")
def byte_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen3-MoE over raw bytes (vocab 256, 8 experts, top-2, 256 positions), ``save_pretrained``."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()
    cfg = T.Qwen3MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        moe_intermediate_size=16, head_dim=8,
    )
    directory = tmp_path_factory.mktemp("byte-moe")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T.Qwen3MoeForCausalLM(cfg).eval().save_pretrained(directory)
    return directory


def expect_error(args, *fragments: str) -> str:
    code, stdout, stderr = run_cli(["routing", *args])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{stderr}"
    assert lines[0].startswith("memc: error: ") and all(ln.startswith("  hint: ") for ln in lines[1:2]), stderr
    assert len(lines) <= 2, stderr  # one message, at most one hint
    assert "Traceback" not in stderr and "internal error" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert stdout == ""
    return lines[0]


def test_tables_json_and_plot(byte_moe_dir: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "r" / "routing.json", tmp_path / "plots"
    code, stdout, stderr = run_cli(["routing", byte_moe_dir, "--text", "heldout:code", "--text", "trainsplit:prose",
                                    "--windows", 3, "--context", 64, "--segments", "4,16", "--json", out,
                                    "--plot", plots])
    assert code == 0, stderr
    for fragment in ("SRP m=4", "SCH m=16", "LRU / LFU / Belady", "Jensen-Shannon", "heldout:code vs trainsplit:prose",
                     "heldout:code: 3 windows x 64 = 192 tokens", "model.layers.1.mlp", "4k slots"):
        assert fragment in stdout, fragment
    result = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["routing.json"]  # atomic: no temporary left behind
    assert [t["tokens"] for t in result["texts"]] == [192, 192]
    assert len(result["layers"]) == 2
    for layer in result["layers"]:
        assert (layer["experts"], layer["top_k"], layer["slots"]) == (EXPERTS, TOP_K, [2, 4, 6, 8])
        assert len(layer["load_jsd_bits"]) == 1 and 0 <= layer["load_jsd_bits"][0]["bits"] <= 1
        for metrics in layer["texts"].values():
            assert set(metrics["srp"]) == {"4", "16"} and set(metrics["sch"]) == {"4", "16"}
            assert sum(metrics["load"]) == pytest.approx(1.0)
            for slots in ("2", "4", "6"):
                rates = {p: metrics["cache"][p][slots] for p in ("lru", "lfu", "belady")}
                assert all(0 < r <= 1 for r in rates.values())
                assert rates["belady"] >= max(rates["lru"], rates["lfu"]) - 1e-12
            assert metrics["cache"]["belady"]["8"] == 1.0  # 8 slots hold every expert
    png = plots / f"{byte_moe_dir.name}_routing.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the JSON records the command line that wrote it (it parses back to the same request); benchmarks render it
    from benchmarks.routing import markdown
    from memc.cli import build_parser

    args = build_parser().parse_args(shlex.split(result["command"])[1:])
    assert (Path(args.model), args.texts, args.windows, args.context, args.segments, args.multiples, args.json_out,
            args.plot_dir) == (byte_moe_dir, ["heldout:code", "trainsplit:prose"], 3, 64, [4, 16], [1, 2, 3, 4],
                               str(out), str(plots))
    md = markdown(result, result["command"])
    assert "## SRP (segment routing best F1)" in md and "| mean | trainsplit:prose |" in md and "| 2k |" in md

    # the traces are moe-calibrate's: the loads equal the pass's selection counts on the same text and windows
    program = DetectMoE().run(captured(byte_moe_dir), PassContext()).program
    opts = CalibrateOptions(text="trainsplit:prose", windows=3, context=64)
    calib = MoECalibrate(opts).run(program, PassContext()).program.annotations[CALIBRATION_KEY]
    assert calib.tokens == 192
    for layer, stats in zip(result["layers"], calib.layers, strict=True):
        counts = stats.count.numpy()
        assert np.allclose(layer["texts"]["trainsplit:prose"]["load"], counts / counts.sum(), atol=1e-12)


def test_bad_texts(byte_moe_dir: Path, text_file) -> None:
    expect_error([byte_moe_dir, "--text", "heldout:poetry"], "--text", "unknown corpus 'heldout:poetry'")
    expect_error([byte_moe_dir, "--text", "trainsplit:poetry"], "--text", "unknown corpus")
    expect_error([byte_moe_dir, "--text", "web:wiki"], "--text", "unknown text 'web:wiki'")
    expect_error([byte_moe_dir, "--text", "/nonexistent/text.txt"], "--text", "text file not found")
    expect_error([byte_moe_dir, "--text", text_file(b" \n\n")], "--text", "is empty")
    expect_error([byte_moe_dir, "--text", text_file(b"caf\xe9 latin-1", "latin1.txt")], "--text", "is not UTF-8")
    expect_error([byte_moe_dir, "--text", "heldout:code", "--text", "heldout:code"], "--text", "once")


def test_bad_models(tiny_hf, tmp_path: Path) -> None:
    expect_error([tiny_hf("llama"), "--text", "heldout:code"], "has no MoE layer")
    expect_error([tmp_path / "missing", "--text", "heldout:code"], "model path does not exist")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    expect_error([garbage], "not a readable Hugging Face config")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(b"")
    expect_error([artifact], "is a compiled artifact")


def test_bad_outputs_and_options(byte_moe_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    expect_error([byte_moe_dir, "--plot", blocker / "plots"], "--plot", "cannot write into")
    expect_error([byte_moe_dir, "--json", blocker / "out.json"], "--json", "cannot write into")
    expect_error([byte_moe_dir, "--json", tmp_path], "--json", "is a directory")
    expect_error([byte_moe_dir, "--windows", 0], "--windows must be >= 1")
    code, _, stderr = run_cli(["routing", byte_moe_dir, "--segments", "0,4"])
    assert code == 2 and "values must be >= 1" in stderr  # argparse's usage error
    assert not (blocker.parent / "out.json").exists()
