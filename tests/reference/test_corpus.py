"""The reference corpus: real stdlib text, split by document, deterministically."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from memc.reference import corpus


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_split_is_by_document_and_disjoint(domain: str) -> None:
    train = corpus.split(domain, held_out=False)
    held = corpus.split(domain, held_out=True)
    names = [d.name for d in corpus.documents(domain)]
    assert len(names) == len(set(names))
    assert {d.name for d in train}.isdisjoint(d.name for d in held)
    assert len(train) + len(held) == len(names)
    assert held and len(train) > 3 * len(held)
    assert all(corpus.is_held_out(domain, d.name) for d in held)


def test_held_out_bytes_never_appear_in_train() -> None:
    """A held-out document's content is not a train document's content (no duplicate files leak)."""
    for domain in corpus.DOMAINS:
        train_data = {d.data for d in corpus.split(domain, held_out=False)}
        leaked = [d.name for d in corpus.split(domain, held_out=True) if len(d.data) > 200 and d.data in train_data]
        assert not leaked, leaked


def test_code_excludes_tests_and_site_packages_and_prose() -> None:
    names = [d.name for d in corpus.documents("code")]
    assert names and all(n.endswith(".py") for n in names)
    assert "unittest/case.py" in names and "pydoc_data/topics.py" not in names
    banned = {"test", "tests", "idle_test", "site-packages"}
    assert not [n for n in names if banned.intersection(n.split("/")[:-1])]


def test_prose_is_pydoc_topics_text() -> None:
    docs = corpus.documents("prose")
    assert len(docs) > 50
    assert any(d.name == "topics/for" and d.data.startswith(b'The "for" statement') for d in docs)
    assert corpus.SEPARATOR not in b"".join(d.data for d in docs)


def test_split_is_deterministic_across_processes() -> None:
    """Same hash in a fresh interpreter (the split does not depend on PYTHONHASHSEED or file order)."""
    code = "from memc.reference import corpus; print(corpus.split_hash())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == corpus.split_hash()


# --- the Debian-package domains (vimhelp, c) ----------------------------------------------------------------------
def require(domain: str) -> None:
    reason = corpus.missing_reason(domain)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("domain", corpus.EXTRA_DOMAINS)
def test_extra_domain_split_is_by_name_and_deduplicated(domain: str) -> None:
    require(domain)
    docs = corpus.documents(domain)
    train, held = corpus.split(domain, held_out=False), corpus.split(domain, held_out=True)
    assert len(train) + len(held) == len(docs) and held and len(train) > 3 * len(held)
    assert [d.name for d in docs] == sorted({d.name for d in docs})
    for d in docs[:50]:  # the split is sha256("domain/name") mod HELD_OUT_MOD, nothing else
        digest = hashlib.sha256(f"{domain}/{d.name}".encode()).digest()
        assert (int.from_bytes(digest[:8], "big") % corpus.HELD_OUT_MOD[domain] == 0) == corpus.is_held_out(domain, d.name)
    assert len({hashlib.sha256(d.data).digest() for d in docs}) == len(docs)  # no content twice, so never both sides
    assert corpus.train_bytes(domain).count(corpus.SEPARATOR) == len(train) - 1  # only the document boundaries
    if domain == "vimhelp":
        assert "doc/options.txt" in {d.name for d in docs}
    else:
        assert all(n.endswith(".h") and n.split("/")[0] in corpus.C_SUBDIRS for n in (d.name for d in docs))


def test_dedupe_keeps_the_first_name_of_identical_files() -> None:
    docs = [corpus.Document("b/x.h", b"same"), corpus.Document("a/x.h", b"same"), corpus.Document("c.h", b"other")]
    assert [d.name for d in corpus._dedupe(docs)] == ["a/x.h", "c.h"]


def test_default_split_hash_covers_the_stdlib_domains_only() -> None:
    """ref-llama / ref-moe record split_hash(); adding domains must not change it."""
    assert corpus.split_hash() == corpus.split_hash(("prose", "code"))
    assert corpus.DOMAINS == ("prose", "code") and corpus.HELD_OUT_MOD["prose"] == 8 and corpus.HELD_OUT_MOD["code"] == 10


def test_missing_package_text_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from memc.errors import ConfigError
    from memc.eval.text import load_text, load_train_text

    monkeypatch.setattr(corpus, "VIM_DOC_GLOB", str(tmp_path / "vim9*" / "doc"))
    caches = (corpus.documents, corpus.train_bytes, corpus.held_out_bytes)
    for cache in caches:
        cache.cache_clear()
    try:
        assert "vim-runtime" in corpus.missing_reason("vimhelp")
        with pytest.raises(corpus.CorpusUnavailable, match="vim-runtime"):
            corpus.documents("vimhelp")
        with pytest.raises(ConfigError, match=r"moe-patterns\.corpora\[1\]: corpus domain 'vimhelp'"):
            load_train_text("trainsplit:vimhelp", "moe-patterns.corpora[1]")
        with pytest.raises(corpus.CorpusUnavailable):
            load_text("heldout:vimhelp")
    finally:
        for cache in caches:
            cache.cache_clear()


@pytest.mark.parametrize("domain", corpus.EXTRA_DOMAINS)
def test_text_specs_read_the_extra_domains(domain: str) -> None:
    from memc.errors import ConfigError, MemcError
    from memc.eval.text import load_text, load_train_text

    require(domain)
    assert load_text(f"heldout:{domain}") == corpus.held_out_bytes(domain)
    assert load_train_text(f"trainsplit:{domain}", "x") == corpus.train_bytes(domain)
    with pytest.raises(ConfigError, match="held-out"):
        load_train_text(f"heldout:{domain}", "x")
    with pytest.raises(MemcError, match="unknown corpus"):
        load_text("heldout:klingon")
