"""Fixtures for the `memc eval` tests: a tiny *byte-level* Llama (vocab 256) and its compiled ONNX artifact, and
a tiny Llama with its own BPE tokenizer, and ``text_file`` (a text file of given bytes in the tmp dir).

The shared tiny models in tests/helpers.py have a vocabulary of 128, which `memc eval` cannot tokenise text for
(no tokenizer files, fewer ids than bytes); perplexity, bits per byte and the recall probe need a byte model.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import CompileResult

BYTE_VOCAB = 256
BYTE_MAX_POS = 256


def save_tiny_llama(directory: Path, seed: int = 0, vocab: int = BYTE_VOCAB) -> Path:
    """A 2-layer LlamaForCausalLM (vocab 256 = raw bytes by default, 256 positions), ``save_pretrained``."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()
    cfg = T.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=BYTE_MAX_POS, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def train_bpe(texts: list[str], vocab: int):
    """A byte-level BPE (tokenizers.Tokenizer) of `vocab` ids learned from `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_bpe_llama(directory: Path, vocab: int = 512, seed: int = 0) -> Path:
    """The tiny Llama over a BPE of `vocab` ids trained on a slice of the reference code, saved with its
    tokenizer.json / tokenizer_config.json as an HF directory."""
    from transformers import PreTrainedTokenizerFast

    from memc.reference import corpus

    tok = train_bpe([corpus.train_bytes("code")[:200_000].decode("utf-8", "ignore")], vocab)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)
    return save_tiny_llama(directory, seed, vocab)


@pytest.fixture(scope="session")
def byte_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("byte-llama"))


@pytest.fixture(scope="session")
def byte_llama_onnx(byte_llama_dir: Path, compiled) -> CompileResult:
    result = compiled(byte_llama_dir)
    assert result.rc == 0, result.explain()
    return result


@pytest.fixture
def text_file(tmp_path: Path):
    """text_file(data, name="text.txt") -> the path of a file holding ``data`` (bytes) in the test's tmp dir."""

    def make(data: bytes, name: str = "text.txt") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return make
