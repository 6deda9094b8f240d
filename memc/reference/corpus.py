"""Offline real text for the reference models: CPython's own docs and sources.

No dataset download works on these machines, so the corpus is what every Python install ships:
``pydoc_data/topics.py`` (English reference prose) and the standard library ``.py`` sources (code).
Train and held-out are split by *document* (a source file, or one pydoc topic, since topics.py is a
single file) with a hash of its name, so held-out text is never trained on and the split does not
depend on file order, machine or process.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DOMAINS = ("prose", "code")
# One prose topic in eight is held out (79 topics of very uneven size: ~58 KB, 12% of the bytes),
# one code file in ten (~1.4 MB).
HELD_OUT_MOD = {"prose": 8, "code": 10}
SEPARATOR = b"\x00"  # document boundary; never occurs in UTF-8 text
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_PROSE_FILE = "pydoc_data/topics.py"


@dataclass(frozen=True)
class Document:
    """One unit of the split: a name that is stable across machines, and its UTF-8 bytes."""

    name: str
    data: bytes


def is_held_out(domain: str, name: str) -> bool:
    """Deterministic by-name split: sha256 of "domain/name", mod the domain's HELD_OUT_MOD."""
    digest = hashlib.sha256(f"{domain}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_MOD[domain] == 0


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=None)
def documents(domain: str) -> tuple[Document, ...]:
    """All documents of a domain, sorted by name."""
    if domain == "prose":
        return _prose_documents()
    if domain == "code":
        return _code_documents()
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def _prose_documents() -> tuple[Document, ...]:
    """topics.py is one file holding a dict literal; each topic's text is a document."""
    source = (stdlib_dir() / _PROSE_FILE).read_text(encoding="utf-8")
    tree = ast.parse(source)
    topics = next(
        node.value for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
    )
    docs = {
        f"topics/{ast.literal_eval(k)}": ast.literal_eval(v).encode("utf-8")
        for k, v in zip(topics.keys, topics.values)
    }
    return tuple(Document(name, docs[name]) for name in sorted(docs))


def _code_documents() -> tuple[Document, ...]:
    """Standard-library .py files outside tests and site-packages (topics.py belongs to prose)."""
    root = stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == _PROSE_FILE or _SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if data and SEPARATOR not in data:
            docs.append(Document(rel, data))
    return tuple(docs)


def split(domain: str, held_out: bool) -> tuple[Document, ...]:
    return tuple(d for d in documents(domain) if is_held_out(domain, d.name) == held_out)


def join(docs: tuple[Document, ...]) -> bytes:
    """One byte stream per split; SEPARATOR marks document boundaries for the byte-level model."""
    return SEPARATOR.join(d.data for d in docs)


@lru_cache(maxsize=None)
def train_bytes(domain: str) -> bytes:
    return join(split(domain, held_out=False))


@lru_cache(maxsize=None)
def held_out_bytes(domain: str) -> bytes:
    return join(split(domain, held_out=True))


def split_hash() -> str:
    """Fingerprint of the split (names and contents of both sides), recorded with each checkpoint.

    The corpus comes from the running Python's stdlib, so a different Python version gives a
    different hash; metrics are only comparable between equal hashes.
    """
    h = hashlib.sha256()
    for domain in DOMAINS:
        for held in (False, True):
            for doc in split(domain, held):
                h.update(f"{domain}|{int(held)}|{doc.name}|".encode())
                h.update(hashlib.sha256(doc.data).digest())
    return h.hexdigest()[:16]


def summary() -> dict[str, dict[str, int]]:
    """Document and byte counts per domain and side, for logs and train_config.json."""
    return {
        domain: {
            "train_docs": len(split(domain, False)),
            "held_out_docs": len(split(domain, True)),
            "train_bytes": len(train_bytes(domain)),
            "held_out_bytes": len(held_out_bytes(domain)),
        }
        for domain in DOMAINS
    }
