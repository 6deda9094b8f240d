"""Shared fixtures: tiny Hugging Face models of real architectures, and compiles cached for the whole session.

Fixtures (all session-scoped; the plain functions behind them are in tests/helpers.py):

* ``tiny_hf(name) -> Path``: a directory with a tiny ``save_pretrained`` model (safetensors) of family ``name``,
  one of ``tests.helpers.ALL_FAMILIES``: llama, qwen2, gpt2, mixtral, qwen2-moe, olmoe (MoE: 4 experts, top-2)
  and bert (``BertModel`` encoder), plus the MoE-only qwen3-moe, deepseek-v3 (8 experts in 2 groups) and gpt-oss. Hidden 32, 2 layers, vocab 128, seed 0. Built once per session, on first use.
* ``tiny_llama_dir``, ``tiny_qwen2_dir``, ``tiny_gpt2_dir``, ``tiny_mixtral_dir``, ``tiny_qwen2_moe_dir``,
  ``tiny_olmoe_dir``, ``tiny_bert_dir``: the same directories by name.
* ``compiled(model, *extra_args) -> CompileResult``: ``memc compile`` run in-process once per distinct
  (model, args) in the session, into a fresh temporary directory. Treat its output directory as read-only.
* ``decode_artifact(name, opset=18) -> Path``: ``decode.onnx`` (memc.codegen.decode.build_decode_artifact) of the
  tiny family ``name``, built once per session. Read-only too.
* ``mc_compiled -> CompileResult``: the memory-caching tiny Llama (capped state) compiled with a decode graph.

Tests that print measured max |Δ| through ``tests.helpers.record_diff`` get them listed in the terminal summary.

Every report.json a compile writes during the session is validated against the shipped schema (memc.report/1):
in this process as it is written (``_reports_match_the_schema`` wraps the compiler's writer), and, at the end of the
session, every report.json in a memc output directory under pytest's temporary root (compiles run as subprocesses).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.helpers import ALL_FAMILIES, RECORDED_DIFFS, CompileResult, compile_model, mc_toolchain, save_tiny_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core (./run tests): each worker's torch and onnxruntime keep to one thread, so the
    # workers do not oversubscribe the cores (subprocess compiles inherit the environment)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MEMC_ORT_THREADS", "1")
    import torch

    torch.set_num_threads(1)

REPORTS_VALIDATED: dict[str, int] = {"written in-process": 0, "found on disk": 0}


@pytest.fixture(scope="session", autouse=True)
def _reports_match_the_schema(tmp_path_factory: pytest.TempPathFactory):
    import memc.compiler
    from memc.atomic import MARKER
    from memc.report_schema import check_report

    write_json = memc.compiler.write_json

    def validating_write_json(path: Path, data: Any) -> None:
        if Path(path).name == memc.compiler.REPORT_FILE:
            check_report(json.loads(json.dumps(data, default=str)), f"the report.json written to {path.parent}")
            REPORTS_VALIDATED["written in-process"] += 1
        write_json(path, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memc.compiler, "write_json", validating_write_json)
        yield
    failures = []
    for path in sorted(tmp_path_factory.getbasetemp().rglob("report.json")):
        if (path.parent / MARKER).is_file():  # a memc output directory (not a test's own JSON file)
            REPORTS_VALIDATED["found on disk"] += 1
            try:
                check_report(json.loads(path.read_text(encoding="utf-8")), str(path))
            except ValueError as exc:
                failures.append(str(exc))
    if failures:
        pytest.fail("report.json files that do not match memc.report/1:\n" + "\n".join(failures), pytrace=False)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in ALL_FAMILIES:
            raise KeyError(f"unknown tiny family {name!r}; expected one of {sorted(ALL_FAMILIES)}")
        if name not in built:
            built[name] = save_tiny_hf(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_hf) -> Path:
    return tiny_hf("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_hf) -> Path:
    return tiny_hf("qwen2")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_hf) -> Path:
    return tiny_hf("gpt2")


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tiny_hf) -> Path:
    return tiny_hf("mixtral")


@pytest.fixture(scope="session")
def tiny_qwen2_moe_dir(tiny_hf) -> Path:
    return tiny_hf("qwen2-moe")


@pytest.fixture(scope="session")
def tiny_olmoe_dir(tiny_hf) -> Path:
    return tiny_hf("olmoe")


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_hf) -> Path:
    return tiny_hf("bert")


def _run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory every xdist worker of this test run shares (the base temp dir's parent under xdist)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def shared_compile(tmp_path_factory: pytest.TempPathFactory, key: str, build: Callable[[Path], CompileResult],
                   ) -> CompileResult:
    """``build(dir)`` once per test run for ``key``, whichever worker asks first; the others wait and read its
    result (artifacts built for several test files are read-only for the tests, which copy before changing them)."""
    import hashlib

    from filelock import FileLock

    root = _run_root(tmp_path_factory) / "shared-compiles"
    root.mkdir(exist_ok=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    record = root / f"{name}.json"
    with FileLock(str(record) + ".lock"):
        if record.is_file():
            data = json.loads(record.read_text())
            return CompileResult(data["rc"], data["stdout"], data["stderr"], Path(data["out_dir"]), data["report"])
        (root / name).mkdir(exist_ok=True)
        res = build(root / name)
        record.write_text(json.dumps({"rc": res.rc, "stdout": res.stdout, "stderr": res.stderr,
                                      "out_dir": str(res.out_dir), "report": res.report}))
        return res


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., CompileResult]:
    """compiled(model, *args): ``memc compile`` once per test run for the same model and arguments (a worker's own
    temp-dir prefix is not part of the key, so the tiny models every worker builds alike share one compile)."""
    base = str(tmp_path_factory.getbasetemp())

    def get(model: Any, *extra: Any) -> CompileResult:
        key = "|".join([str(model).replace(base, "<tmp>"), *map(str, extra)])
        return shared_compile(tmp_path_factory, key, lambda d: compile_model(model, d / "out", *extra))

    return get


@pytest.fixture(scope="session")
def decode_artifact(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    built: dict[tuple[str, int], Path] = {}

    def get(name: str, opset: int = 18) -> Path:
        if (name, opset) not in built:
            from memc.codegen.decode import build_decode_artifact

            out = tmp_path_factory.mktemp(f"decode-{name}-{opset}")
            built[name, opset] = build_decode_artifact(tiny_hf(name), out, opset)
        return built[name, opset]

    return get


@pytest.fixture(scope="session")
def mc_compiled(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> CompileResult:
    """memc compile of the tiny Llama rewritten by detect-attention + memory-caching (tests.helpers.MC_OPTIONS,
    capped state) with ``decode_graph = true``: model.onnx + decode.onnx whose state has no context axis."""
    def build(d: Path) -> CompileResult:
        res = compile_model(tiny_hf("llama"), d / "out", "-c", mc_toolchain(d / "toolchain.toml"))
        assert res.rc == 0, res.explain()
        return res

    return shared_compile(tmp_path_factory, "memory-caching decode (tests.helpers.MC_OPTIONS)", build)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist a worker hands its counts and diffs to the controller, which prints the summary."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["memc"] = json.dumps({"reports": REPORTS_VALIDATED, "diffs": RECORDED_DIFFS})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    data = json.loads(getattr(node, "workeroutput", {}).get("memc", "null") or "null")
    if data:
        for what, n in data["reports"].items():
            REPORTS_VALIDATED[what] += n
        RECORDED_DIFFS.update(data["diffs"])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if any(REPORTS_VALIDATED.values()):
        terminalreporter.write_line(
            "memc: report.json validated against memc.report/1: "
            + ", ".join(f"{n} {what}" for what, n in REPORTS_VALIDATED.items())
        )
    if RECORDED_DIFFS:
        terminalreporter.section("memc: measured max |Δ| (artifact vs original)")
        for label, value in RECORDED_DIFFS.items():
            terminalreporter.write_line(f"{label:40s} max|Δ|={value:.3g}")
