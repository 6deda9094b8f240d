"""benchmarks/harness.py: cases run in a fresh process and report their own peak RSS; failures surface as
errors instead of hanging; result tables are written as Markdown and JSON side by side."""
from __future__ import annotations

import json
import os
import threading

import pytest

from benchmarks import harness
from benchmarks.harness import Table, run_case

CASES = "tests.benchmarks.cases"


def _run_with_deadline(target: str, seconds: float = 120, **params):
    """run_case in a thread: a harness that hangs fails this test instead of the whole run."""
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = run_case(target, **params)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"run_case({target}) hung for {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_run_case_runs_in_a_fresh_process() -> None:
    small = _run_with_deadline(f"{CASES}:ok_case", n=1, label="small")
    big = _run_with_deadline(f"{CASES}:ok_case", n=64, label="big")
    for res, n, label in ((small, 1, "small"), (big, 64, "big")):
        assert res["n"] == n and res["label"] == label and res["sum"] == n * 256
        assert res["pid"] != os.getpid()
        assert isinstance(res["peak_rss_mb"], float) and res["peak_rss_mb"] > 0
    assert small["pid"] != big["pid"]
    # peak RSS is the child's own: the 64 MiB case shows it, the 1 MiB case does not
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 48


def test_failing_case_raises_with_the_childs_message() -> None:
    with pytest.raises(RuntimeError, match=r"benchmark case tests\.benchmarks\.cases:failing_case failed: "
                                           r"ValueError: the case broke on purpose"):
        _run_with_deadline(f"{CASES}:failing_case")
    with pytest.raises(RuntimeError, match=r"ModuleNotFoundError"):
        _run_with_deadline("tests.benchmarks.no_such_module:case")
    with pytest.raises(RuntimeError, match=r"TypeError"):  # wrong parameters
        _run_with_deadline(f"{CASES}:ok_case", nope=1)


def test_child_that_dies_without_reporting_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"exiting_case.*exit code 7"):
        _run_with_deadline(f"{CASES}:exiting_case", seconds=60)


def test_unpicklable_result_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"unpicklable_case"):
        _run_with_deadline(f"{CASES}:unpicklable_case", seconds=60)


def _table() -> Table:
    t = Table("unit_table", "python -m benchmarks.fake --x 1", ["metric", "a", "b"])
    t.rows.append(["speed", 1.23456, 12345.6])
    t.rows.append(["memory", 7, "n/a"])
    t.notes.append("One note.")
    t.raw = {"a": {"k": [1, 2]}}
    return t


def test_table_markdown() -> None:
    md = _table().markdown()
    lines = md.splitlines()
    assert lines[0] == "`python -m benchmarks.fake --x 1`"
    assert lines[1] == ""
    assert lines[2] == "| metric | a | b |"
    assert lines[3] == "|---|---|---|"
    assert lines[4] == "| speed | 1.235 | 12,346 |"  # floats: 4 significant digits, large ones grouped
    assert lines[5] == "| memory | 7 | n/a |"
    assert "One note." in lines[6:]
    table_rows = [line for line in lines if line.startswith("| ")]
    assert len(table_rows) == 1 + 2  # header + one per row


def test_table_write(tmp_path, monkeypatch) -> None:
    results = tmp_path / "results"
    monkeypatch.setattr(harness, "RESULTS", results)
    t = _table()
    md = t.write()
    assert md == results / "unit_table.md"
    assert md.read_text(encoding="utf-8") == t.markdown()
    payload = json.loads((results / "unit_table.json").read_text(encoding="utf-8"))
    assert payload["command"] == t.command and payload["columns"] == t.columns
    assert payload["rows"] == [["speed", 1.23456, 12345.6], ["memory", 7, "n/a"]]
    assert payload["raw"] == {"a": {"k": [1, 2]}}
    assert set(payload["env"]) == {"python", "machine", "cpus", "cpu"}
    assert payload["env"]["cpu"] == harness.cpu_info() and "(" in payload["env"]["cpu"]  # model and ISA
    assert not (harness.Path(harness.__file__).parent / "results" / "unit_table.md").exists()


def test_table_publish_writes_and_prints_the_table(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    t = _table()
    path = t.publish()
    printed = capsys.readouterr().out
    assert path.read_text(encoding="utf-8") == t.markdown()
    assert t.markdown() in printed and printed.rstrip().endswith(f"wrote {path}")
