"""The reference corpus: real stdlib text, split by document, deterministically."""
from __future__ import annotations

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
