"""ExpertCacheEngine on the session's expert-cache compile (tiny Qwen3-MoE, 4 experts top-2, 2 slots): counts per
step, greedy generation equal to the full model, `memc generate` with its hit-rate line, no torch import."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest

from memc.runtime.artifact import load
from memc.runtime.command import GenerateRequest, generate_command
from memc.runtime.engine import DecodeStateError
from memc.runtime.expert_cache import ExpertCacheEngine
from tests.helpers import VOCAB
from tests.runtime.test_generate_cli import write_char_tokenizer

SLOTS = ("--set", "target.expert_cache.slots=2")


@pytest.fixture(scope="module")
def artifact(compiled, tiny_hf, tmp_path_factory):
    result = compiled(tiny_hf("qwen3-moe"), *SLOTS)  # the same compile as tests/codegen/test_expert_cache.py
    assert result.rc == 0, result.explain()
    out = tmp_path_factory.mktemp("expert-cache") / "artifact"
    shutil.copytree(result.out_dir, out)
    write_char_tokenizer(out)
    return out


def test_every_step_asks_k_experts_per_layer(artifact):
    engine = ExpertCacheEngine(artifact)
    logits, state = engine.prefill(np.arange(6) % VOCAB)
    before = [l.cache.stats.requests for l in engine.layers]
    for t in range(5):
        logits, state = engine.step(int(logits[0, -1].argmax()), state)
    stats = engine.stats()
    for b, layer in zip(before, stats["layers"]):
        assert layer["requests"] - b == 5 * 2  # top-2 of 4: two distinct experts per token
        assert layer["hits"] + layer["loads"] == layer["requests"]
    assert stats["hit_rate"] == sum(l["hits"] for l in stats["layers"]) / stats["requests"]
    assert stats["slot_bytes"] == sum(b.nbytes for l in engine.layers for b in l.buffers)
    with pytest.raises(DecodeStateError, match="slots must be in 2..4"):
        ExpertCacheEngine(artifact, slots=1)
    with pytest.raises(DecodeStateError, match="state has 0 arrays"):
        engine.step(1, [])


def test_greedy_tokens_equal_the_full_model(artifact):
    """Greedy through the cache (2 of 4 experts resident) == greedy by full forwards of model.onnx."""
    prompt = np.array([[5, 17, 99, 3]], dtype=np.int64)
    model, seq = load(artifact), prompt
    assert model.has_expert_cache
    got = model.expert_cache().generate(prompt, 10)
    for _ in range(10):
        (logits,) = model.run(seq)
        seq = np.concatenate([seq, logits[:, -1:].argmax(-1)], axis=1)
    np.testing.assert_array_equal(got, seq)


def test_memc_generate_reports_the_hit_rate(artifact):
    out, err = io.StringIO(), io.StringIO()
    result = generate_command(GenerateRequest(str(artifact), prompt="def f(x):", max_new_tokens=6, threads=1), out, err)
    cache = result["expert_cache"]
    assert cache["slots"] == 2 and len(cache["layers"]) == 2 and 0.0 <= cache["hit_rate"] <= 1.0
    assert "expert cache 2 slots: hit rate" in err.getvalue() and "2 of 4 experts resident" in err.getvalue()
    assert len(result["tokens"]) == 6
    override = generate_command(GenerateRequest(str(artifact), prompt="def f(x):", max_new_tokens=6, slots=4,
                                                as_json=True), io.StringIO(), io.StringIO())
    assert override["tokens"] == result["tokens"] and override["expert_cache"]["slots"] == 4


def test_the_engine_does_not_import_torch(artifact):
    code = ("import sys; from memc.runtime.expert_cache import ExpertCacheEngine; "
            f"e = ExpertCacheEngine({str(artifact)!r}); e.generate([1, 2, 3], 3); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_byte_level_models_read_text_as_bytes(tmp_path):
    """ref-moe (vocabulary 256) ships no tokenizer: `memc generate` reads and writes its text as UTF-8 bytes."""
    from memc.errors import ArtifactError
    from memc.runtime.text import TextStream, load_tokenizer

    tok = load_tokenizer(tmp_path, 256)
    ids = tok.encode("déf x")
    assert ids.tolist() == list("déf x".encode("utf-8")) and tok.decode(ids) == "déf x"
    stream = TextStream(tok.decode)
    assert "".join(stream.push(i) for i in ids) + stream.finish() == "déf x"
    with pytest.raises(ArtifactError, match="has no tokenizer"):
        load_tokenizer(tmp_path, 128)
