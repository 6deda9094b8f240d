"""Evaluation text: named offline corpora or files, tokenised the way the model expects."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memc.errors import ConfigError, MemcError
from memc.eval.backends import ModelInfo
from memc.tokenizer_files import has_tokenizer

HELD_OUT_PREFIX = "heldout:"
TRAIN_PREFIX = "trainsplit:"


def load_text(spec: str) -> bytes:
    """``heldout:<domain>`` (the reference corpus split by file: prose, code, vimhelp, c) or a path to a text file."""
    if spec.startswith(HELD_OUT_PREFIX):
        from memc.reference import corpus

        domain = spec[len(HELD_OUT_PREFIX):]
        if domain not in corpus.ALL_DOMAINS:
            raise MemcError(f"unknown corpus {spec!r}; choose heldout:{' or heldout:'.join(corpus.ALL_DOMAINS)}")
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


def load_train_text(spec: str, option: str) -> bytes:
    """Text a pass may learn from: ``trainsplit:<domain>`` (prose, code, vimhelp, c) or a UTF-8 file, never held-out
    text.

    Learning from the evaluation text would make every held-out measurement of the compiled model optimistic, so a
    file that contains held-out documents of the reference corpus is refused too. ``option`` is the option's key
    path, named in every error (e.g. ``pipeline[2].text``).
    """
    from memc.reference import corpus

    train = f"{TRAIN_PREFIX}{f' or {TRAIN_PREFIX}'.join(corpus.ALL_DOMAINS)}"
    if spec.startswith(HELD_OUT_PREFIX):
        raise ConfigError(f"{option}: {spec!r} is held-out evaluation text; passes learn from the train split only "
                          f"(use {train}, or a file of your own training text)")
    if spec.startswith(TRAIN_PREFIX):
        domain = spec[len(TRAIN_PREFIX):]
        if domain not in corpus.ALL_DOMAINS:
            raise ConfigError(f"{option}: unknown corpus {spec!r}; use {train}")
        try:
            return corpus.train_bytes(domain)
        except corpus.CorpusUnavailable as exc:
            raise ConfigError(f"{option}: {exc}") from None
    try:
        data = load_text(spec)
    except MemcError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    stripped = data.strip()
    for domain in (d for d in corpus.ALL_DOMAINS if corpus.available(d)):
        held = corpus.held_out_bytes(domain)
        if (len(stripped) >= 256 and stripped in held) or any(
                len(d.data) >= 64 and d.data in data for d in corpus.split(domain, True)):
            raise ConfigError(f"{option}: {spec} contains held-out {domain} text of memc's reference corpus; "
                              f"learn from the train split ({train})")
    return data


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes each id of an HF tokenizer stands for, so bits/byte are exact rather than averaged.

    A byte-level BPE (GPT-2 style) writes each byte as one alphabet character, so a token's length in
    characters is its length in bytes; other tokenizers are decoded id by id.
    """
    from tokenizers import decoders

    n = len(tokenizer)
    if isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
        special = set(tokenizer.all_special_ids)
        return np.array([0 if i in special else len(tokenizer.convert_ids_to_tokens(i)) for i in range(n)], np.int64)
    return np.array([len(tokenizer.decode([i]).encode("utf-8")) for i in range(n)], np.int64)


@dataclass(frozen=True)
class TextCodec:
    """How a model reads text: ``encode`` maps UTF-8 bytes to int64 ids, ``lengths[id]`` is the bytes an id spans."""

    kind: str  # "bytes" (token = byte value) or "hf" (the model directory's tokenizer)
    encode: Callable[[bytes], np.ndarray]
    lengths: np.ndarray


def encode_bytes(data: bytes) -> np.ndarray:
    """A byte-level model's ids: the byte values."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def text_codec(info: ModelInfo) -> TextCodec:
    """The model directory's tokenizer when it ships one, else raw bytes for a vocabulary of >= 256."""
    vocab = info.vocab_size or 0
    if has_tokenizer(info.tokenizer_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(info.tokenizer_dir, local_files_only=True)

        def encode(data: bytes) -> np.ndarray:
            return np.asarray(tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"], dtype=np.int64)

        return TextCodec("hf", encode, token_byte_lengths(tok))
    if vocab >= 256:
        return TextCodec("bytes", encode_bytes, np.ones(vocab, np.int64))
    raise MemcError(
        f"cannot tokenise text for this model: no tokenizer files and a vocabulary of {vocab} (< 256 bytes)"
    )


def tokenize(data: bytes, info: ModelInfo, codec: TextCodec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (int64) and the bytes each token spans."""
    codec = codec or text_codec(info)
    ids = codec.encode(data)
    vocab = info.vocab_size or 0
    if vocab and ids.size and int(ids.max()) >= vocab:
        raise MemcError(f"the text has token id {int(ids.max())} but the model's vocabulary is {vocab}")
    return ids, codec.lengths[ids]
