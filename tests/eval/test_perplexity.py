"""Perplexity and bits per byte: the numbers memc reports equal the textbook definition computed independently
with transformers, and the compiled ONNX artifact reports the same perplexity as its torch source."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memc.errors import MemcError
from memc.eval.backends import Backend, ModelInfo, load_backend
from memc.eval.perplexity import log_softmax_nll, perplexity
from memc.reference import corpus
from tests.helpers import load_hf_original, run_cli

CONTEXT = 64
WINDOWS = 4


@pytest.fixture(scope="module")
def heldout_code() -> bytes:
    return corpus.held_out_bytes("code")


def _reference_ppl(model_dir, data: bytes, context: int, windows: int) -> float:
    """exp(mean cross-entropy) over the first ``windows`` non-overlapping windows, straight from transformers."""
    model = load_hf_original(model_dir)
    ids = torch.frombuffer(bytearray(data[: windows * context]), dtype=torch.uint8).long().reshape(windows, context)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))
    return math.exp(float(ce))


# -- log_softmax_nll --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_log_softmax_nll_matches_cross_entropy(scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen) * scale
    targets = torch.randint(0, 50, (3, 7), generator=gen)
    ours = log_softmax_nll(logits.numpy(), targets.numpy())
    ref = F.cross_entropy(logits.double().reshape(-1, 50), targets.reshape(-1), reduction="none").reshape(3, 7)
    assert ours.shape == (3, 7)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-9, atol=1e-9 * scale)


def test_log_softmax_nll_does_not_modify_its_input() -> None:
    logits = np.random.default_rng(0).standard_normal((2, 5, 9)).astype(np.float64)
    copy = logits.copy()
    log_softmax_nll(logits, np.zeros((2, 5), dtype=np.int64))
    np.testing.assert_array_equal(logits, copy)


# -- perplexity on a fake backend: windowing and bits per byte --------------------------------------------------
class _FixedLogits(Backend):
    """Returns the same random logits table for every position (a unigram model), deterministically."""

    name = "fake"

    def __init__(self, vocab: int = 256):
        self.info = ModelInfo("causal-lm", ["input_ids"], vocab, 1024, 0, None)
        self.table = np.random.default_rng(1).standard_normal(vocab).astype(np.float32) * 3
        self.calls: list[tuple[int, ...]] = []

    def forward(self, feeds):
        ids = feeds["input_ids"]
        self.calls.append(ids.shape)
        return np.broadcast_to(self.table, (*ids.shape, len(self.table))).copy()


def test_perplexity_windows_and_bits_per_byte() -> None:
    backend = _FixedLogits()
    tokens = np.random.default_rng(2).integers(0, 256, size=1000).astype(np.int64)
    spans = np.random.default_rng(3).integers(1, 5, size=1000)  # bytes per token, as a BPE would have
    res = perplexity(backend, tokens, 100, token_bytes=spans, max_windows=3)
    assert backend.calls == [(1, 100)] * 3  # non-overlapping windows of exactly `context`, capped by max_windows
    logp = torch.log_softmax(torch.from_numpy(backend.table).double(), -1).numpy()
    scored = np.concatenate([tokens[w * 100 + 1 : (w + 1) * 100] for w in range(3)])  # first token of a window unscored
    scored_bytes = sum(int(spans[w * 100 + 1 : (w + 1) * 100].sum()) for w in range(3))
    nll = float(-logp[scored].mean())
    assert res.windows == 3 and res.tokens_scored == 3 * 99 and res.bytes_scored == scored_bytes
    assert res.nll_per_token == pytest.approx(nll, rel=1e-12)
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-12)
    assert res.bits_per_byte == pytest.approx(nll * 3 * 99 / math.log(2) / scored_bytes, rel=1e-12)
    assert perplexity(backend, tokens, 100, max_windows=3).bytes_scored == 3 * 99  # one byte a token by default


def test_perplexity_rejects_encoders_and_short_text() -> None:
    enc = _FixedLogits()
    enc.info.task = "encoder"
    with pytest.raises(MemcError, match="causal LM"):
        perplexity(enc, np.zeros(100, np.int64), 10)
    with pytest.raises(MemcError, match="one window of context 64 needs at least 64"):
        perplexity(_FixedLogits(), np.zeros(63, np.int64), 64)
    with pytest.raises(MemcError, match="longer than the model supports"):
        perplexity(_FixedLogits(), np.zeros(4096, np.int64), 2048)


# -- a real byte-level Llama: torch source, ONNX artifact, transformers ------------------------------------------
def test_torch_source_perplexity_equals_transformers_cross_entropy(byte_llama_dir, heldout_code) -> None:
    backend = load_backend(str(byte_llama_dir))
    assert backend.name == "torch" and backend.info.vocab_size == 256
    tokens = np.frombuffer(heldout_code, dtype=np.uint8).astype(np.int64)
    res = perplexity(backend, tokens, CONTEXT, max_windows=WINDOWS)
    expected = _reference_ppl(byte_llama_dir, heldout_code, CONTEXT, WINDOWS)
    assert res.windows == WINDOWS and res.tokens_scored == WINDOWS * (CONTEXT - 1)
    assert res.perplexity == pytest.approx(expected, rel=1e-5)
    # a random model is far from both a perfect (1) and a degenerate number: the comparison means something
    assert 50 < res.perplexity < 5000


def _eval_json(tmp_path, model, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    rc, stdout, stderr = run_cli(
        ["eval", model, "--text", "heldout:code", "--context", CONTEXT, "--max-windows", WINDOWS, "--json", out]
    )
    assert rc == 0, stderr
    assert "perplexity" in stdout
    return json.loads(out.read_text())


def test_onnx_artifact_perplexity_matches_torch_source_and_transformers(
    byte_llama_dir, byte_llama_onnx, heldout_code, tmp_path
) -> None:
    onnx_res = _eval_json(tmp_path, byte_llama_onnx.out_dir, "onnx")
    torch_res = _eval_json(tmp_path, byte_llama_dir, "torch")
    assert onnx_res["backend"] == "onnxruntime" and torch_res["backend"] == "torch"
    p_onnx, p_torch = onnx_res["perplexity"], torch_res["perplexity"]
    for p in (p_onnx, p_torch):
        assert p["tokenizer"] == "bytes"
        assert p["windows"] == WINDOWS and p["context"] == CONTEXT and p["tokens_scored"] == WINDOWS * (CONTEXT - 1)
        assert p["bytes_scored"] == p["tokens_scored"]
        # byte model: bits per byte is the per-token NLL in bits
        assert p["bits_per_byte"] == pytest.approx(p["nll_per_token"] / math.log(2), rel=1e-12)
        assert p["perplexity"] == pytest.approx(math.exp(p["nll_per_token"]), rel=1e-12)
    assert p_onnx["perplexity"] == pytest.approx(p_torch["perplexity"], rel=1e-3)
    expected = _reference_ppl(byte_llama_dir, heldout_code, CONTEXT, WINDOWS)
    assert p_onnx["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert p_torch["perplexity"] == pytest.approx(expected, rel=1e-5)
    print(f"byte llama ppl: transformers {expected:.6f} torch {p_torch['perplexity']:.6f} onnx {p_onnx['perplexity']:.6f}")
