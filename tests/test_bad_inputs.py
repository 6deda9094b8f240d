"""Every bad input to `memc compile` gives one clear message, a non-zero exit, no traceback and no output.

Most cases call ``memc.cli.main`` in-process (torch is imported once) and read stderr at the file-descriptor level
(``capfd``), so log records torch writes through its own handlers are seen too; a few run the real ``python -m memc``
in a subprocess to prove the same on a fresh interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from memc.cli import main

REPO = Path(__file__).resolve().parents[1]
CUSTOM_OP_MODULE = "memc_badinput_customop"


@dataclass
class Result:
    rc: int
    out: str
    err: str


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


class _WritesMarker:
    """Unpickling this creates ``path``: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A real .pt2, a truncated copy, random bytes named .pt2, a non-model directory and a custom-op factory."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    ep = torch.export.export(_Tiny().eval(), (torch.randn(2, 4),))
    torch.export.save(ep, str(d / "good.pt2"))
    data = (d / "good.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(data[: len(data) // 2])
    (d / "corrupt.pt2").write_bytes(os.urandom(4096))
    (d / "not-a-model").mkdir()
    (d / "not-a-model" / "weights.bin").write_bytes(b"\0" * 16)
    (d / f"{CUSTOM_OP_MODULE}.py").write_text(
        textwrap.dedent(
            '''
            import torch

            @torch.library.custom_op("memc_badinput::mystery", mutates_args=())
            def mystery(x: torch.Tensor) -> torch.Tensor:
                return x * 2

            @mystery.register_fake
            def _(x):
                return torch.empty_like(x)

            class Block(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = torch.nn.Linear(4, 4)

                def forward(self, x):
                    return mystery(self.lin(x))

            class Net(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.block = Block()

                def forward(self, x):
                    return torch.relu(self.block(x))

            def make():
                return Net(), (torch.randn(2, 4),)
            '''
        )
    )
    yield d
    sys.modules.pop(CUSTOM_OP_MODULE, None)


@pytest.fixture
def outs(tmp_path) -> Path:
    """An empty parent directory for -o; after a failure it must still be empty (no hidden staging dirs either)."""
    d = tmp_path / "outs"
    d.mkdir()
    return d


@pytest.fixture
def memc(capfd, monkeypatch, models):
    """Run `memc ...` in-process from the models directory; returns rc, stdout, stderr."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(models)

    def _run(*args: str) -> Result:
        capfd.readouterr()
        rc = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return Result(rc, out, err)

    return _run


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "toolchain.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def assert_clean_failure(result: Result, outs: Path, *needles: str, exit_code: int = 2) -> str:
    """One `memc: error:` message holding every needle, no traceback, no other noise, nothing written."""
    assert result.rc == exit_code, result.err
    assert "Traceback" not in result.err and "Traceback" not in result.out
    assert result.err.count("memc: error:") == 1, result.err
    assert "internal error" not in result.err
    noise = [line for line in result.err.splitlines() if line and not line.startswith(("memc ", "memc:", "  "))]
    assert noise == [], f"stderr holds more than memc's message:\n{result.err}"
    message = result.err[result.err.index("memc: error:") :]
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert sorted(os.listdir(outs)) == [], "no output directory and no .staging-/.old- leftovers"
    return message


# -- the model argument --------------------------------------------------------------------------------------------


def test_missing_path(memc, outs):
    result = memc("compile", "models/llama-7b", "-o", outs / "result")
    assert_clean_failure(result, outs, "model path does not exist: models/llama-7b")


def test_missing_pt2(memc, outs):
    result = memc("compile", "gone.pt2", "-o", outs / "result")
    assert_clean_failure(result, outs, "model path does not exist", "gone.pt2")


def test_directory_that_is_not_a_model(memc, outs):
    result = memc("compile", "not-a-model", "-o", outs / "result")
    assert_clean_failure(result, outs, "not-a-model is a directory but not a model", "no config.json", "hint:")


def test_unrecognised_file_type(memc, models, outs):
    result = memc("compile", models / "not-a-model" / "weights.bin", "-o", outs / "result")
    assert_clean_failure(result, outs, "unrecognised model file type '.bin'")


@pytest.mark.parametrize("name", ["corrupt.pt2", "truncated.pt2"])
def test_unreadable_pt2(memc, outs, name):
    result = memc("compile", name, "-o", outs / "result")
    assert_clean_failure(result, outs, f"{name} is not a readable torch.export archive", "corrupt or truncated")


def test_pickle_needs_trust_and_is_not_loaded(memc, models, outs, tmp_path):
    marker = tmp_path / "UNPICKLED"
    torch.save(_WritesMarker(marker), tmp_path / "model.pt")
    result = memc("compile", tmp_path / "model.pt", "-o", outs / "result")
    assert_clean_failure(result, outs, "refusing to load", "it is a pickle", "--trust-pickle")
    assert not marker.exists(), "memc unpickled the file without --trust-pickle"


def test_pickle_marker_proves_loading_with_trust(memc, outs, tmp_path):
    """Control for the test above: with --trust-pickle the same file is unpickled (and then rejected)."""
    marker = tmp_path / "UNPICKLED"
    torch.save(_WritesMarker(marker), tmp_path / "model.pt")
    result = memc("compile", tmp_path / "model.pt", "--trust-pickle", "-o", outs / "result")
    assert marker.exists()
    assert_clean_failure(result, outs, "expected an nn.Module")


def test_pickled_state_dict(memc, outs, tmp_path):
    torch.save(_Tiny().state_dict(), tmp_path / "weights.pt")
    result = memc("compile", tmp_path / "weights.pt", "--trust-pickle", "-o", outs / "result")
    assert_clean_failure(result, outs, "holds a state_dict, not an nn.Module")


# -- toolchain.toml ------------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "unknown-pass": (
        '[[pipeline]]\npass = "eliminate-dead-code"\n[[pipeline]]\npass = "quantize-everything"\n',
        ["pipeline[1].pass", "unknown pass 'quantize-everything'", "eliminate-dead-code"],
    ),
    "unknown-pass-first": (
        '[[pipeline]]\npass = "eliminate_dead_code"\n',
        ["pipeline[0].pass", "unknown pass 'eliminate_dead_code'", "did you mean 'eliminate-dead-code'"],
    ),
    "unknown-key": ("[target]\nopsett = 18\n", ["target.opsett", "unknown key", "did you mean 'opset'"]),
    "wrong-type": ('[inputs]\nbatch = "two"\n', ["inputs.batch", "expected int", "'two'"]),
    "bool-for-int": ("[inputs]\nbatch = true\n", ["inputs.batch", "expected int, got bool True"]),
    "nested-list-entry": (
        '[[inputs.tensors]]\nname = "x"\nshape = [2, 4]\ndtype = "f32"\n',
        ["inputs.tensors[0].dtype", "'f32' is not one of", "'float32'"],
    ),
    "pass-option": (
        '[[pipeline]]\npass = "eliminate-dead-code"\naggressive = true\n',
        ["pipeline[0].aggressive", "unknown key"],
    ),
    "not-toml": ("[target\nopset = 18\n", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config(memc, outs, tmp_path, case):
    text, needles = BAD_CONFIGS[case]
    config = _toml(tmp_path, text)
    result = memc("compile", "good.pt2", "--config", config, "-o", outs / "result")
    assert_clean_failure(result, outs, *needles)


def test_valid_passes_are_listed_for_an_unknown_pass(memc, outs, tmp_path):
    config = _toml(tmp_path, '[[pipeline]]\npass = "zzz"\n')
    message = assert_clean_failure(memc("compile", "good.pt2", "-c", config, "-o", outs / "r"), outs, "pipeline[0].pass")
    assert "eliminate-dead-code" in message.split("'zzz'", 1)[1]


def test_missing_config_file(memc, outs, tmp_path):
    result = memc("compile", "good.pt2", "--config", tmp_path / "nope.toml", "-o", outs / "result")
    assert_clean_failure(result, outs, "config file not found", "nope.toml")


@pytest.mark.parametrize("case", ["unknown-pass", "unknown-key", "wrong-type", "nested-list-entry"])
def test_dry_run_with_a_bad_config_fails_the_same_way(memc, outs, tmp_path, case):
    config = _toml(tmp_path, BAD_CONFIGS[case][0])
    real = memc("compile", "good.pt2", "--config", config, "-o", outs / "result")
    dry = memc("compile", "good.pt2", "--config", config, "-o", outs / "result", "--dry-run")
    assert dry.rc == real.rc != 0
    assert dry.err == real.err
    assert dry.out == ""
    assert_clean_failure(dry, outs, *BAD_CONFIGS[case][1])


def test_dry_run_with_a_bad_model_fails_the_same_way(memc, outs):
    real = memc("compile", "not-a-model", "-o", outs / "result")
    dry = memc("compile", "not-a-model", "-o", outs / "result", "--dry-run")
    assert dry.rc == real.rc == 2 and dry.err == real.err


def test_dry_run_prints_the_plan_and_writes_nothing(memc, outs):
    result = memc("compile", "good.pt2", "--config", REPO / "toolchain.toml", "-o", outs / "result", "--dry-run")
    assert result.rc == 0, result.err
    assert "Traceback" not in result.err
    assert "configuration is valid" in result.out
    assert "model:   good.pt2 (pt2)" in result.out
    assert "0. eliminate-dead-code" in result.out
    assert "target:  onnx (opset 23" in result.out
    assert f"output:  {outs / 'result'}" in result.out
    assert os.listdir(outs) == []


def test_dry_run_refuses_a_foreign_output_dir(memc, outs):
    foreign = outs / "result"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = memc("compile", "good.pt2", "-o", foreign, "--dry-run")
    assert result.rc == 2 and "not created by memc" in result.err and "Traceback" not in result.err
    assert os.listdir(foreign) == ["notes.txt"]


# -- the target ----------------------------------------------------------------------------------------------------


def test_op_the_onnx_target_cannot_express(memc, outs):
    result = memc("compile", f"{CUSTOM_OP_MODULE}:make", "--no-progress", "-o", outs / "result")
    message = assert_clean_failure(
        result, outs, "the onnx target cannot express 1 node(s)", "node 'mystery'", "memc_badinput.mystery",
        "module 'block'", "no ONNX translation",
    )
    assert "hint:" in message


# -- the output directory ------------------------------------------------------------------------------------------


def test_existing_foreign_output_dir_is_not_overwritten(memc, tmp_path):
    parent = tmp_path / "outs"
    foreign = parent / "result"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    result = memc("compile", "good.pt2", "--no-progress", "-o", foreign)
    assert result.rc == 2
    assert "Traceback" not in result.err and result.err.count("memc: error:") == 1
    assert f"output directory {foreign} exists and was not created by memc" in result.err
    assert sorted(os.listdir(parent)) == ["result"], "no staging directory next to it"
    assert os.listdir(foreign) == ["thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_output_path_that_is_a_file(memc, outs):
    (outs / "result").write_text("a file")
    result = memc("compile", "good.pt2", "-o", outs / "result")
    assert result.rc == 2 and "not created by memc" in result.err and "Traceback" not in result.err
    assert (outs / "result").read_text() == "a file"


# -- a fresh interpreter: the real entry point, real stderr ----------------------------------------------------------


@pytest.mark.parametrize(
    "args, needles",
    [
        (["corrupt.pt2"], ["not a readable torch.export archive"]),
        (["good.pt2", "--config", "BAD"], ["target.opsett", "did you mean 'opset'"]),
    ],
    ids=["corrupt-pt2", "unknown-key"],
)
def test_subprocess(models, outs, tmp_path, args, needles):
    config = _toml(tmp_path, "[target]\nopsett = 18\n")
    args = [str(config) if a == "BAD" else a for a in args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "memc", "compile", *args, "--no-progress", "-o", str(outs / "result")],
        cwd=models, env=env, capture_output=True, text=True, timeout=300,
    )
    assert_clean_failure(Result(proc.returncode, proc.stdout, proc.stderr), outs, *needles)
