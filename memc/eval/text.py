"""Evaluation text: named offline corpora or files, tokenised the way the model expects."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memc.errors import MemcError
from memc.eval.backends import ModelInfo

HELD_OUT_PREFIX = "heldout:"


def load_text(spec: str) -> bytes:
    """``heldout:code`` / ``heldout:prose`` (the reference corpus split by file) or a path to a text file."""
    if spec.startswith(HELD_OUT_PREFIX):
        from memc.reference import corpus

        domain = spec[len(HELD_OUT_PREFIX):]
        if domain not in corpus.DOMAINS:
            raise MemcError(f"unknown corpus {spec!r}; choose heldout:{' or heldout:'.join(corpus.DOMAINS)}")
        return corpus.held_out_bytes(domain)
    path = Path(spec)
    if not path.is_file():
        raise MemcError(f"text file not found: {spec}")
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise MemcError(f"{spec} is not UTF-8 text") from None
    if not data.strip():
        raise MemcError(f"{spec} is empty")
    return data


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def has_tokenizer(directory: Path | None) -> bool:
    """Whether an HF directory ships tokenizer files. (transformers' AutoTokenizer does not tell: for a directory
    without them it builds an empty tokenizer that maps every word to [UNK].)"""
    return directory is not None and any((directory / f).exists() for f in TOKENIZER_FILES)


def tokenize(data: bytes, info: ModelInfo) -> tuple[np.ndarray, str]:
    """Tokens (int64) and the tokenizer used: raw bytes for byte-level models (vocab 256..), else the HF tokenizer."""
    vocab = info.vocab_size or 0
    tokenizer_dir = info.source_dir
    if has_tokenizer(tokenizer_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        ids = np.asarray(tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"], dtype=np.int64)
        kind = "hf"
    elif vocab >= 256:
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        kind = "bytes"
    else:
        raise MemcError(
            f"cannot tokenise text for this model: no tokenizer files and a vocabulary of {vocab} (< 256 bytes)"
        )
    if vocab and ids.size and int(ids.max()) >= vocab:
        raise MemcError(f"the text has token id {int(ids.max())} but the model's vocabulary is {vocab}")
    return ids, kind
