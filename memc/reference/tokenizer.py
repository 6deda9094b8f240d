"""Text <-> token ids for the reference models: raw bytes, or a byte-level BPE trained on the train split.

A byte-level model spends a whole transformer step on every byte, so in the same compute it sees 3-4x less
text than a BPE model and its 1024-token context spans 1 KB instead of ~3.5 KB of code. The BPE here is
trained on the *train* documents only (the held-out files never shape the vocabulary), with a GPT-2 style
byte-level alphabet: every byte string encodes losslessly and every token is an exact byte string, so
bits/byte stay exact (`token_byte_lengths`). Training is deterministic: same corpus, same tokenizer.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from memc.eval.text import encode_bytes, token_byte_lengths
from memc.reference import corpus
from memc.tokenizer_files import has_tokenizer


def train_tokenizer(
    vocab_size: int, domains: tuple[str, ...] = corpus.DOMAINS, sample_bytes: int | None = None
) -> PreTrainedTokenizerFast:
    """Byte-level BPE of `vocab_size` ids learned from the train documents of `domains`, in name order (per domain
    only the first documents up to `sample_bytes`, when given: learning merges from 25 MB takes minutes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    def sample(domain: str):
        total = 0
        for doc in corpus.split(domain, held_out=False):
            if sample_bytes is not None and total >= sample_bytes:
                return
            total += len(doc.data)
            yield doc.data.decode("utf-8")

    tok.train_from_iterator((text for d in domains for text in sample(d)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer, or None for a byte-level checkpoint (no tokenizer files)."""
    path = Path(path)
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode(data: bytes, tokenizer: PreTrainedTokenizerBase | None) -> np.ndarray:
    """int64 ids of `data`: its bytes for a byte-level model, else the tokenizer's ids (no special tokens)."""
    if tokenizer is None:
        return encode_bytes(data)
    ids = tokenizer.backend_tokenizer.encode(data.decode("utf-8"), add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int64)


def byte_lengths(tokenizer: PreTrainedTokenizerBase | None) -> np.ndarray:
    """Bytes each id stands for (all ones for a byte-level model)."""
    return np.ones(256, np.int64) if tokenizer is None else token_byte_lengths(tokenizer)


def describe(tokenizer: PreTrainedTokenizerBase | None) -> str:
    return "bytes" if tokenizer is None else f"byte-level BPE, {len(tokenizer)} ids"
