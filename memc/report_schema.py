"""The versioned schema of report.json: its id, the JSON Schema file shipped in the package, and validation.

CI systems gate releases on report.json; the schema lets them read the verification numbers without guessing.
Within ``memc.report/1`` memc only adds keys; removing, renaming or retyping one means ``memc.report/2``.
torch-free (``memc schema report`` and ``memc.load`` use it); validation needs the ``jsonschema`` package.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

REPORT_SCHEMA_ID = "memc.report/1"
_FILES = {"report": "report-1.schema.json"}


def schema_names() -> list[str]:
    return sorted(_FILES)


def schema_text(name: str = "report") -> str:
    """The JSON Schema file as shipped (what ``memc schema NAME`` prints)."""
    return resources.files("memc").joinpath("schemas", _FILES[name]).read_text(encoding="utf-8")


@functools.cache
def report_schema() -> dict[str, Any]:
    return json.loads(schema_text("report"))


def report_errors(report: Any) -> list[str]:
    """Every way ``report`` violates the shipped schema, as ``path: message`` lines (empty: valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(report_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors]


def check_report(report: Any, where: str = "report") -> None:
    """Raise ValueError naming every schema violation (a report memc writes that fails this is a memc bug)."""
    errors = report_errors(report)
    if errors:
        raise ValueError(f"{where} does not match {REPORT_SCHEMA_ID}:\n  " + "\n  ".join(errors))
