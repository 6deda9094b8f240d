"""Atomic output directories: a failed compile leaves nothing, a successful one replaces only memc's own output."""
from __future__ import annotations

import json

import pytest

from memc.atomic import MARKER, atomic_file, check_output_dir, staged_output_dir, write_json
from memc.errors import MemcError


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_success_renames_staging_into_place(tmp_path):
    final = tmp_path / "out"
    with staged_output_dir(final) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.staging-")
        assert not final.exists(), "nothing is visible at the final path before the body finishes"
        (stage / "model.onnx").write_bytes(b"onnx")
    assert _names(tmp_path) == ["out"]
    assert _names(final) == sorted([MARKER, "model.onnx"])


def test_body_raising_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(final) as stage:
            (stage / "half-written.bin").write_bytes(b"\0" * 100)
            raise RuntimeError("boom")
    assert _names(tmp_path) == [], "no output directory and no hidden staging leftovers"


def test_body_raising_keeps_the_previous_output(tmp_path):
    final = tmp_path / "out"
    with staged_output_dir(final) as stage:
        (stage / "v1.txt").write_text("v1")
    with pytest.raises(MemcError):
        with staged_output_dir(final) as stage:
            (stage / "v2.txt").write_text("v2")
            raise MemcError("verification failed")
    assert _names(tmp_path) == ["out"]
    assert _names(final) == sorted([MARKER, "v1.txt"])


def test_replaces_a_previous_memc_output(tmp_path):
    final = tmp_path / "out"
    with staged_output_dir(final) as stage:
        (stage / "old.txt").write_text("old")
        (stage / "sub").mkdir()
        (stage / "sub" / "deep.txt").write_text("old")
    with staged_output_dir(final) as stage:
        (stage / "new.txt").write_text("new")
    assert _names(final) == sorted([MARKER, "new.txt"]), "the old output is replaced, not merged"
    assert _names(tmp_path) == ["out"], "no .old-/.staging- directories are left behind"


def test_refuses_a_foreign_non_empty_directory(tmp_path):
    final = tmp_path / "precious"
    final.mkdir()
    (final / "thesis.tex").write_text("years of work")
    with pytest.raises(MemcError, match="not created by memc"):
        with staged_output_dir(final):
            pytest.fail("the body must not run")
    assert _names(final) == ["thesis.tex"]
    assert (final / "thesis.tex").read_text() == "years of work"
    assert _names(tmp_path) == ["precious"], "no staging directory was created"


def test_refuses_an_existing_file(tmp_path):
    final = tmp_path / "out"
    final.write_text("a file, not a directory")
    with pytest.raises(MemcError):
        check_output_dir(final)
    assert final.read_text() == "a file, not a directory"


def test_accepts_an_empty_existing_directory(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    check_output_dir(final)
    with staged_output_dir(final) as stage:
        (stage / "a.txt").write_text("a")
    assert _names(final) == sorted([MARKER, "a.txt"])


def test_creates_missing_parents(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    with staged_output_dir(final) as stage:
        (stage / "x").write_text("x")
    assert (final / "x").read_text() == "x"
    assert _names(final.parent) == ["out"]


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"a": 1, "nested": {"b": [1, 2]}})
    assert json.loads(path.read_text()) == {"a": 1, "nested": {"b": [1, 2]}}
    write_json(path, {"a": 2, "path": tmp_path})  # non-JSON values are stringified
    assert json.loads(path.read_text()) == {"a": 2, "path": str(tmp_path)}
    assert _names(tmp_path) == ["report.json"], "no temporary file is left"


def test_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"v": 1})

    class Unserialisable:
        def __str__(self):
            raise ValueError("cannot render")

    with pytest.raises(ValueError):
        write_json(path, {"v": Unserialisable()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert _names(tmp_path) == ["report.json"]


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "decode.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["decode.onnx"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old", "the old file stays until the block succeeds"
    assert target.read_bytes() == b"new" and _names(tmp_path) == ["decode.onnx"]
    assert target.stat().st_mode & 0o444 == 0o444  # readable like any other file, not mkstemp's 0600

