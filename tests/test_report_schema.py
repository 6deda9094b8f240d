"""The versioned report schema: the shipped file is a valid JSON Schema, `memc schema report` prints it without
importing torch, and it rejects reports that break the contract. (That every report the suite writes validates is
checked by the session fixture ``_reports_match_the_schema`` in tests/conftest.py.)"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from memc.report_schema import REPORT_SCHEMA_ID, check_report, report_errors, report_schema, schema_text
from tests.helpers import REPO_ROOT, run_cli

SCHEMA_FILE = REPO_ROOT / "memc" / "schemas" / "report-1.schema.json"


def test_shipped_schema_is_a_valid_json_schema():
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == REPORT_SCHEMA_ID == "memc.report/1"
    assert schema["properties"]["schema"] == {"const": REPORT_SCHEMA_ID, "description": schema["properties"]["schema"]["description"]}
    assert report_schema() == schema


def test_schema_file_is_package_data():
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'memc = ["schemas/*.json"]' in text


def test_memc_schema_report_prints_the_file_without_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = (
        "import sys, memc.cli; rc = memc.cli.main(['schema', 'report']); "
        "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == SCHEMA_FILE.read_text(encoding="utf-8")
    assert proc.stderr.endswith("NO-TORCH")


def test_memc_schema_rejects_unknown_names():
    res = run_cli(["schema", "reports"])
    assert res.rc == 2 and "invalid choice: 'reports'" in res.stderr


@pytest.fixture(scope="module")
def report(compiled, tiny_llama_dir) -> dict:
    res = compiled(tiny_llama_dir)
    assert res.rc == 0, res.explain()
    return res.report


def test_a_real_report_validates(report):
    assert report["schema"] == REPORT_SCHEMA_ID
    assert report_errors(report) == []


@pytest.mark.parametrize(
    "break_it, where",
    [
        (lambda r: r.pop("verification"), "(top level): 'verification' is a required property"),
        (lambda r: r.update(schema="memc.report/2"), "schema: 'memc.report/1' was expected"),
        (lambda r: r["verification"].update(passed="yes"), "verification/passed: 'yes' is not of type 'boolean'"),
        (lambda r: r["verification"]["max_abs_diff"].update(logits=-1.0), "verification/max_abs_diff/logits"),
        (lambda r: r["verification"]["samples"][0].pop("mode"), "verification/samples/0: 'mode' is a required property"),
        (lambda r: r["target"]["artifacts"][0].update(bytes="12"), "target/artifacts/0/bytes"),
        (lambda r: r["passes"].append({"name": "x"}), "passes/0: 'options' is a required property"),
        (lambda r: r["source"].update(kind="zip"), "source/kind: 'zip' is not one of"),
        (lambda r: r["capture"]["inputs"]["input_ids"].update(shape=[2, "s"]), "capture/inputs/input_ids/shape/1"),
    ],
)
def test_schema_rejects_broken_reports(report, break_it, where):
    broken = copy.deepcopy(report)
    break_it(broken)
    errors = report_errors(broken)
    assert any(e.startswith(where) for e in errors), errors
    with pytest.raises(ValueError, match="does not match memc.report/1"):
        check_report(broken)


def test_readers_may_meet_added_keys(report):
    """Within version 1 memc only adds keys: a report with more keys still validates."""
    extended = {**copy.deepcopy(report), "budget": {"bytes": 1}}
    extended["verification"]["extra"] = 1
    assert report_errors(extended) == []


def test_typed_report_views(compiled, tiny_llama_dir):
    from memc.report import Report

    out = compiled(tiny_llama_dir).out_dir
    report = Report.load(out)
    assert Report.load(out / "report.json") == report
    assert report.schema == REPORT_SCHEMA_ID and report.passed is report["verification"]["passed"] is True
    assert report.verification.worst == report["verification"]["max_abs_diff"]
    assert report.source.kind == "hf" and report.source.task == "causal-lm"
    assert [a.path for a in report.artifacts] == ["model.onnx"] and report.passes == []


def test_schema_text_is_the_file():
    assert schema_text("report") == Path(SCHEMA_FILE).read_text(encoding="utf-8")
