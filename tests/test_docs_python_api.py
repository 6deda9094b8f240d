"""docs/python-api.md: the complete build script runs as written, in a fresh interpreter, and its gate can fail."""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from memc.report_schema import report_errors
from tests.helpers import REPO_ROOT

DOC = REPO_ROOT / "docs" / "python-api.md"


def build_script() -> str:
    """The python block under '## A complete build script'."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## A complete build script", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("release") / "release.py"
    path.write_text(build_script(), encoding="utf-8")
    return path


def test_build_script_releases(script):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MIN_ACCURACY": "0.95"}
    proc = subprocess.run([sys.executable, script.name], cwd=script.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "release ok: out/release (memc.report/1)" in proc.stdout
    rounded = re.search(r"round-weights: (\d+) matrices, max change (\S+)", proc.stdout)
    assert rounded and int(rounded.group(1)) == 3 and float(rounded.group(2)) > 0, proc.stdout
    accuracy = re.search(r"original (\S+), compiled (\S+)", proc.stdout)
    original, compiled = float(accuracy.group(1)), float(accuracy.group(2))
    assert compiled >= 0.95 and original - compiled <= 0.01, proc.stdout
    print(proc.stdout)
    report = json.loads((script.parent / "out" / "release" / "report.json").read_text(encoding="utf-8"))
    assert report_errors(report) == []
    assert [p["name"] for p in report["passes"]] == ["round-weights", "eliminate-dead-code"]
    assert report["source"]["kind"] == "module"


def test_build_script_blocks_a_release_below_the_threshold(script, monkeypatch, capsys):
    """The same script with an unreachable accuracy bar exits non-zero and says why (run in this process)."""
    monkeypatch.setenv("MIN_ACCURACY", "1.01")
    monkeypatch.chdir(script.parent)
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert str(info.value).startswith("release blocked: held-out accuracy")
    assert "< 1.01" in str(info.value)
