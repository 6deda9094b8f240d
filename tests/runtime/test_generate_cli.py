"""`memc generate`: text through an artifact's decode graph and shipped tokenizer, from the artifact alone.

The tiny models have a vocabulary of 128 and no tokenizer, so the artifacts here get a character-level
tokenizer.json of exactly 128 characters (what `memc compile` would have copied from a source directory that had
one): the tiny Llama's KV decode graph, and the session's memory-caching compile (model.onnx + decode.onnx +
report.json, capped state). The fresh-shell test copies the latter, hides the source model and runs the console
command from another directory.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memc.runtime.command import GenerateRequest, generate_command
from memc.runtime.engine import DecodeEngine
from memc.runtime.text import TextStream, load_tokenizer
from tests.helpers import MAX_POS, VOCAB, run_cli, run_memc

PROMPT = "def main(args):\n    return"
CHARS = "\n\t" + "".join(map(chr, range(32, 127)))
CHARS += "".join(chr(0xC0 + i) for i in range(VOCAB - len(CHARS)))  # 128 printable characters in all


def write_char_tokenizer(directory: Path, chars: str = CHARS) -> None:
    """tokenizer.json: one id per character (a BPE without merges), decoded by concatenation."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def kv_artifact(decode_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen-kv")
    shutil.copy(decode_artifact("llama"), out / "decode.onnx")
    write_char_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def mc_artifact(mc_compiled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen-mc") / "artifact"
    shutil.copytree(mc_compiled.out_dir, out)
    write_char_tokenizer(out)
    return out


def _run(artifact, *args, **kw):
    out, err = io.StringIO(), io.StringIO()
    result = generate_command(GenerateRequest(str(artifact), **kw), out, err)
    return result, out.getvalue(), err.getvalue()


def test_greedy_text_equals_the_engine_and_streams(kv_artifact):
    result, out, err = _run(kv_artifact, prompt=PROMPT, max_new_tokens=12)
    tok = load_tokenizer(kv_artifact)
    prompt = tok.encode(PROMPT)
    want = DecodeEngine(kv_artifact).generate(prompt, 12)[len(prompt):]
    assert result["tokens"] == want.tolist() and result["stop_reason"] == "max_new_tokens"
    assert out == tok.decode(want) + "\n" == result["text"] + "\n"
    assert f"context limit {MAX_POS} positions" in err
    last = err.strip().splitlines()[-1]
    assert "tokens/s" in last and "ms/token" in last and "11 steps" in last
    assert result["state_bytes"] == DecodeEngine(kv_artifact).state_bytes_at(len(prompt) + 11)


def test_sampling_options_are_used_and_seeded(kv_artifact):
    a = _run(kv_artifact, prompt=PROMPT, max_new_tokens=10, temperature=1.2, top_k=50, top_p=0.95, seed=1)[0]
    b = _run(kv_artifact, prompt=PROMPT, max_new_tokens=10, temperature=1.2, top_k=50, top_p=0.95, seed=1)[0]
    c = _run(kv_artifact, prompt=PROMPT, max_new_tokens=10, temperature=1.2, top_k=50, top_p=0.95, seed=2)[0]
    assert a["tokens"] == b["tokens"] != c["tokens"]
    assert a["sampling"] == {"temperature": 1.2, "top_k": 50, "top_p": 0.95, "seed": 1}


def test_stop_text_ends_the_output_before_it(kv_artifact):
    free = _run(kv_artifact, prompt=PROMPT, max_new_tokens=24)[0]["text"]
    stop = free.strip()[3:6]
    assert stop and stop in free
    result, out, _ = _run(kv_artifact, prompt=PROMPT, max_new_tokens=24, stop=[stop])
    assert result["stop_reason"] == "stop_text" and result["text"] == free[:free.index(stop)]
    assert out == result["text"] + "\n" and len(result["tokens"]) < 24


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    pieces = ["ab", "c\ufffd", "é", "x\n", "\nrest"]  # a decode() whose outputs grow token by token
    decode = lambda ids: "".join(pieces[: len(ids)]).replace("\ufffdé", "é")  # noqa: E731
    stream = TextStream(decode, ["\n\n"])
    assert [stream.push(i) for i in range(5)] == ["ab", "c", "é", "x", ""]
    assert stream.stopped and stream.text == "abcéx" and stream.finish() == ""
    free = TextStream(decode, [])
    assert "".join(free.push(i) for i in range(5)) + free.finish() == "abcéx\n\nrest"


def test_bounded_state_says_there_is_no_limit(mc_artifact):
    long_prompt = "x = 1\n" * 40  # more tokens than the model's trained positions: no limit applies
    result, out, err = _run(mc_artifact, prompt=long_prompt, max_new_tokens=4)
    assert result["prompt_tokens"] == 240 > MAX_POS and len(result["tokens"]) == 4
    assert "bounded state" in err and "no context limit" in err and result["context_limit"] is None
    assert result["bounded_state"] is True
    engine = DecodeEngine(mc_artifact)
    assert result["state_bytes"] == engine.state_bytes_at(0) == engine.state_bytes_at(10**6)


def test_fresh_shell_with_only_the_artifact(mc_artifact, tmp_path):
    """Copy a compiled artifact, point its recorded source at a path that does not exist, run the console command
    from another cwd (the source model itself is shared with other tests and other test workers: not moved)."""
    copy = tmp_path / "deploy" / "artifact"
    shutil.copytree(mc_artifact, copy)
    report = json.loads((copy / "report.json").read_text())
    assert Path(report["source"]["path"]).is_dir()  # the artifact records the model it came from
    report["source"]["path"] = str(tmp_path / "moved-away")
    (copy / "report.json").write_text(json.dumps(report))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    args = ["generate", str(copy), "--prompt", PROMPT, "--max-new-tokens", "6"]
    rc, stdout, stderr = run_memc([*args, "--json"], cwd=elsewhere)
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert len(result["tokens"]) == 6 and result["prompt_tokens"] == len(PROMPT) and result["bounded_state"]
    assert set(result["timings"]) >= {"prefill_tokens_per_s", "decode_ms_per_token"}
    rc, stdout, stderr = run_memc(args, cwd=elsewhere)
    assert rc == 0 and stdout == result["text"] + "\n", stderr
    assert "ms/token" in stderr.splitlines()[-1] and "no context limit" in stderr
    code = ("import sys; from memc.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'memc generate imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout == stdout, proc.stderr[-2000:]


# -- bad input: one message, exit 2 ---------------------------------------------------------------------------------
def _cli(*args) -> tuple[int, str]:
    rc, _, err = run_cli(["generate", *map(str, args)])
    assert "Traceback" not in err
    return rc, err


def test_prompt_longer_than_the_model(kv_artifact):
    rc, err = _cli(kv_artifact, "--prompt", "x" * MAX_POS)
    assert rc == 2 and f"the prompt is {MAX_POS} tokens, longer than this model allows" in err
    assert f"{MAX_POS} positions" in err and f"at most {MAX_POS - 1} prompt tokens" in err


def test_artifact_without_a_decode_graph(kv_artifact, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(kv_artifact, plain, ignore=shutil.ignore_patterns("decode.onnx"))
    rc, err = _cli(plain, "--prompt", "hi")
    assert rc == 2 and "has no decode graph" in err and "decode_graph = true" in err
    rc, err = _cli(tmp_path / "nope", "--prompt", "hi")
    assert rc == 2 and "does not exist" in err


def test_prompt_file_errors(kv_artifact, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    rc, err = _cli(kv_artifact, "--prompt-file", bad)
    assert rc == 2 and "is not UTF-8 text" in err and "latin1.txt" in err
    rc, err = _cli(kv_artifact, "--prompt-file", tmp_path / "missing.txt")
    assert rc == 2 and "does not exist" in err
    good = tmp_path / "p.txt"
    good.write_text(PROMPT, encoding="utf-8")
    result = _run(kv_artifact, prompt_file=str(good), max_new_tokens=3)[0]
    assert result["tokens"] == _run(kv_artifact, prompt=PROMPT, max_new_tokens=3)[0]["tokens"]


@pytest.mark.parametrize("args, needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-k", "-2"], "--top-k must be an int >= 0"),
    (["--top-p", "0"], r"--top-p must be in (0, 1]"),
    (["--stop", ""], "--stop: a stop string must not be empty"),
])
def test_bad_options(kv_artifact, args, needle):
    rc, err = _cli(kv_artifact, "--prompt", "hi", *args)
    assert rc == 2 and needle in err


def test_prompt_is_required_once(kv_artifact):
    rc, err = _cli(kv_artifact)
    assert rc == 2 and "--prompt" in err
    rc, err = _cli(kv_artifact, "--prompt", "a", "--prompt-file", "b")
    assert rc == 2 and "not allowed with" in err
    rc, err = _cli(kv_artifact, "--prompt", "")
    assert rc == 2 and "the prompt is empty" in err


def test_missing_tokenizer(decode_artifact):
    """The tiny vocab-128 model has no tokenizer files: say so, and how an artifact gets them."""
    rc, err = _cli(decode_artifact("llama").parent, "--prompt", "hi")
    assert rc == 2 and "has no tokenizer" in err and "tokenizer.json" in err


def test_tokenizer_of_another_model_is_refused(decode_artifact, tmp_path):
    art = tmp_path / "mismatch"
    art.mkdir()
    shutil.copy(decode_artifact("llama"), art / "decode.onnx")  # vocab 128
    write_char_tokenizer(art, "".join(chr(0x100 + i) for i in range(300)) + "z")  # "z" is id 300
    rc, err = _cli(art, "--prompt", "zz")
    assert rc == 2 and "produced id 300" in err and "do not belong to this model" in err, err
