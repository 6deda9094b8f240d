"""Sentence-embedding fidelity of an encoder: cosine similarity of mean-pooled embeddings against a reference."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from memc.errors import MemcError
from memc.eval.backends import Backend
from memc.tokenizer_files import TOKENIZER_FILES, has_tokenizer


@dataclass
class CosineResult:
    sentences: int
    mean: float
    min: float

    def as_dict(self) -> dict:
        return asdict(self)


def real_sentences(text: bytes, n: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first ``n`` prose sentences of reasonable length (deterministic)."""
    words = re.sub(r"\s+", " ", text.decode("utf-8", errors="ignore"))
    out = []
    for s in re.split(r"(?<=[.!?])\s+", words):
        if min_words <= len(s.split()) <= max_words and re.match(r"^[A-Z]", s):
            out.append(s.strip())
            if len(out) == n:
                break
    if not out:
        raise MemcError("no usable sentences in the text (need prose with sentences of 6-40 words)")
    return out


def embed(backend: Backend, sentences: list[str], batch: int = 16, max_len: int = 128) -> np.ndarray:
    if backend.info.task != "encoder":
        raise MemcError("embedding cosine needs an encoder model")
    tok_dir = backend.info.tokenizer_dir
    if not has_tokenizer(tok_dir):
        where = f" ({tok_dir} has no {' / '.join(TOKENIZER_FILES)})" if tok_dir is not None else ""
        raise MemcError(
            f"embedding cosine needs the encoder's tokenizer{where}: compile from an HF directory that has one"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    chunks = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        hidden = backend.forward(feeds).astype(np.float64)
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
        chunks.append(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True))
    return np.concatenate(chunks)


def embedding_cosine(backend: Backend, reference: Backend, sentences: list[str]) -> CosineResult:
    a, b = embed(backend, sentences), embed(reference, sentences)
    cos = (a * b).sum(-1)
    return CosineResult(len(sentences), float(cos.mean()), float(cos.min()))
