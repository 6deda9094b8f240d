"""Offline real text for the reference models: CPython's own docs and sources, and two Debian packages' texts.

No dataset download works on these machines, so the corpus is what every Python install ships:
``pydoc_data/topics.py`` (English reference prose) and the standard library ``.py`` sources (code).
Train and held-out are split by *document* (a source file, or one pydoc topic, since topics.py is a
single file) with a hash of its name, so held-out text is never trained on and the split does not
depend on file order, machine or process.

EXTRA_DOMAINS add text of other kinds from Debian packages (``./run setup`` installs them where it can):
"vimhelp" (Vim's help files, package vim-runtime) and "c" (the Linux UAPI C headers, package linux-libc-dev).
Their documents are deduplicated by content (the first name in sorted order keeps a file that ships twice),
so an identical file can never sit on both sides of the split. The stdlib domains keep their historical split
(ref-llama's and ref-moe's metrics were measured on it) and ``split_hash()`` covers them only, by default.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memc.errors import MemcError

DOMAINS = ("prose", "code")
EXTRA_DOMAINS = ("vimhelp", "c")
ALL_DOMAINS = DOMAINS + EXTRA_DOMAINS
# One prose topic in eight is held out (79 topics of very uneven size: ~58 KB, 12% of the bytes),
# one code file in ten (~1.4 MB); one vim help file in eight (151 files, ~9.8 MB), one header in ten (~800).
HELD_OUT_MOD = {"prose": 8, "code": 10, "vimhelp": 8, "c": 10}
# Where each extra domain's files live, the glob under it, and the Debian package that ships them.
VIM_DOC_GLOB = "/usr/share/vim/vim9*/doc"
C_INCLUDE_DIR = Path("/usr/include")
C_SUBDIRS = ("linux", "asm-generic")
PACKAGES = {"vimhelp": "vim-runtime", "c": "linux-libc-dev"}
SEPARATOR = b"\x00"  # document boundary; never occurs in UTF-8 text
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_PROSE_FILE = "pydoc_data/topics.py"


class CorpusUnavailable(MemcError):
    """A corpus domain's files are not installed on this machine."""


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
    """All documents of a domain, sorted by name (CorpusUnavailable when its package is not installed)."""
    if domain == "prose":
        return _prose_documents()
    if domain == "code":
        return _code_documents()
    if domain in EXTRA_DOMAINS:
        reason = missing_reason(domain)
        if reason:
            raise CorpusUnavailable(reason, hint=f"apt-get install {PACKAGES[domain]} (./run setup tries it as root)")
        files = _vim_doc_files() if domain == "vimhelp" else _c_header_files()
        return _dedupe(_read(files))
    raise ValueError(f"unknown domain {domain!r}; expected one of {ALL_DOMAINS}")


def _vim_doc_dir() -> Path | None:
    """The newest installed vim9x runtime's doc directory (vim90, vim91, ...), or None."""
    dirs = sorted(Path("/").glob(VIM_DOC_GLOB.lstrip("/")))
    return dirs[-1] if dirs else None


def _vim_doc_files() -> dict[str, Path]:
    root = _vim_doc_dir()
    return {} if root is None else {f"doc/{p.name}": p for p in sorted(root.glob("*.txt"))}


def _c_header_files() -> dict[str, Path]:
    return {
        p.relative_to(C_INCLUDE_DIR).as_posix(): p
        for sub in C_SUBDIRS for p in sorted((C_INCLUDE_DIR / sub).rglob("*.h")) if p.is_file()
    }


def missing_reason(domain: str) -> str | None:
    """Why a domain cannot be read here (for errors and test skips), or None when its files are installed."""
    if domain in DOMAINS:
        return None
    if domain == "vimhelp":
        found = bool(_vim_doc_files())
        where = f"{VIM_DOC_GLOB}/*.txt"
    elif domain == "c":
        found = bool(_c_header_files())
        where = " and ".join(f"{C_INCLUDE_DIR / s}/**/*.h" for s in C_SUBDIRS)
    else:
        raise ValueError(f"unknown domain {domain!r}; expected one of {ALL_DOMAINS}")
    return None if found else f"corpus domain {domain!r} reads {where} (Debian package {PACKAGES[domain]}): no such files"


def available(domain: str) -> bool:
    return missing_reason(domain) is None


def _read(files: dict[str, Path]) -> list[Document]:
    """UTF-8 files without the separator byte, as documents named by their stable relative name."""
    docs = []
    for name in sorted(files):
        data = files[name].read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if data.strip() and SEPARATOR not in data:
            docs.append(Document(name, data))
    return docs


def _dedupe(docs: list[Document]) -> tuple[Document, ...]:
    """One document per distinct content (the first name in sorted order), so no file is on both sides."""
    seen: set[bytes] = set()
    kept = []
    for doc in sorted(docs, key=lambda d: d.name):
        digest = hashlib.sha256(doc.data).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(doc)
    return tuple(kept)


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


def split_hash(domains: tuple[str, ...] = DOMAINS) -> str:
    """Fingerprint of the split of `domains` (names and contents of both sides), recorded with each checkpoint.

    The corpus comes from the running Python's stdlib (and the installed Debian packages for the extra
    domains), so a different version gives a different hash; metrics are only comparable between equal hashes.
    """
    h = hashlib.sha256()
    for domain in domains:
        for held in (False, True):
            for doc in split(domain, held):
                h.update(f"{domain}|{int(held)}|{doc.name}|".encode())
                h.update(hashlib.sha256(doc.data).digest())
    return h.hexdigest()[:16]


def summary(domains: tuple[str, ...] = DOMAINS) -> dict[str, dict[str, int]]:
    """Document and byte counts per domain and side, for logs and train_config.json."""
    return {
        domain: {
            "train_docs": len(split(domain, False)),
            "held_out_docs": len(split(domain, True)),
            "train_bytes": len(train_bytes(domain)),
            "held_out_bytes": len(held_out_bytes(domain)),
        }
        for domain in domains
    }
