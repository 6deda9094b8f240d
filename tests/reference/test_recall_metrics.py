"""memc.reference.recall_metrics: its window-by-window bits/byte are the ones `memc eval` reports, and the
paired difference of a model with itself is exactly zero."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memc.eval.backends import Backend, ModelInfo
from memc.eval.perplexity import perplexity
from memc.eval.text import load_text, tokenize
from memc.reference.metrics import load
from memc.reference.recall_metrics import paired_bits_per_byte
from tests.eval.conftest import save_bpe_llama

CONTEXT = 256


class HFBackend(Backend):
    """The HF model itself behind memc eval's Backend interface (float32), without a torch.export capture."""

    name = "hf"

    def __init__(self, path: Path):
        self.model = load(path)
        self.info = ModelInfo("causal-lm", ["input_ids"], self.model.config.vocab_size, CONTEXT, 0, path)

    @torch.inference_mode()
    def forward(self, feeds):
        return self.model(input_ids=torch.from_numpy(feeds["input_ids"])).logits.float().numpy()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bpe-llamas")
    return save_bpe_llama(root / "a", vocab=512, seed=0), save_bpe_llama(root / "b", vocab=512, seed=1)


def test_bits_per_byte_are_memc_evals(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_models
    torch.set_num_threads(1)
    text = tmp_path / "code.py"  # 12 windows of held-out code keep the test fast
    text.write_bytes(load_text("heldout:code")[:40_000])
    r = paired_bits_per_byte(a, b, CONTEXT, bits_cache=tmp_path / "bits", text=str(text))
    for path, key in ((a, "bits_per_byte"), (b, "base_bits_per_byte")):
        backend = HFBackend(path)
        tokens, spans = tokenize(load_text(str(text)), backend.info)
        ppl = perplexity(backend, tokens, CONTEXT, token_bytes=spans, batch=8)
        assert r["windows"] == ppl.windows >= 10 and r["scored_bytes"] == int(ppl.bytes_scored)
        assert r[key] == pytest.approx(ppl.bits_per_byte, abs=1e-4)
    assert r["delta_bits_per_byte"] == pytest.approx(r["bits_per_byte"] - r["base_bits_per_byte"], abs=2e-4)
    assert r["delta_paired_se"] > 0
    assert sorted(f.name for f in (tmp_path / "bits").iterdir()) == ["a.npy", "b.npy"]
    again = paired_bits_per_byte(a, b, CONTEXT, bits_cache=tmp_path / "bits", text=str(text))
    assert again == r
    same = paired_bits_per_byte(a, a, CONTEXT, text=str(text))
    assert same["delta_bits_per_byte"] == 0.0 and same["delta_paired_se"] == 0.0
    assert np.isfinite(same["bits_per_byte"])
