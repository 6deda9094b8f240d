"""benchmarks/mixed_bits.py: a 3-bit uniform point is counted at its dense bytes (it exists only as torch
fake-quant), and --merge appends another run's rows and raw entries without duplicating its own."""
from __future__ import annotations

import json

import pytest

import benchmarks.mixed_bits as mb
from benchmarks.harness import Table
from memc.capture import capture
from memc.config import ToolchainConfig
from memc.quant.formats import parse_format
from memc.quant.sites import find_weights


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int3_counts_dense_bytes(tiny_llama_dir, method) -> None:
    cfg = ToolchainConfig()
    cfg.inputs.seq_len = 16
    program = capture(str(tiny_llama_dir), cfg)
    weights, _ = find_weights(program)
    fmt = parse_format("int3-g32")
    calib = [program.example_inputs] if method == "gptq" else []
    p, stored = mb._fake_quant(program, {w.name: fmt for w in weights}, method, calib)
    assert stored == sum(fmt.nbytes(w.shape, "dense") for w in weights)
    assert stored < sum(parse_format("int4-g32").nbytes(w.shape) for w in weights)  # its 4-bit onnx container
    assert p.module is not program.module


def test_merge_appends_other_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(mb, "RESULTS", tmp_path)
    other = {"command": "python -m benchmarks.mixed_bits --rows uniform", "rows": [["uniform int4-g128", "rtn"]],
             "raw": {"uniform int4-g128 [rtn]": {"bytes": 1}, "fp32_bits_per_byte": 9.0}}
    (tmp_path / "part.json").write_text(json.dumps(other))
    own = Table("t", "cmd", ["point", "quantizer"], [["memc ILP", "gptq"]], ["note"], {"fp32_bits_per_byte": 1.0})
    merged = mb._merged(own, "part")
    assert merged.rows == [["memc ILP", "gptq"], ["uniform int4-g128", "rtn"]]
    assert merged.raw["fp32_bits_per_byte"] == 1.0 and merged.raw["uniform int4-g128 [rtn]"] == {"bytes": 1}
    assert own.rows == [["memc ILP", "gptq"]]  # the run's own table is left as it was
    assert mb._merged(own, "") is own and mb._merged(own, "missing") is own


def test_merge_only_writes_runs_in_order_with_their_notes(tmp_path, monkeypatch) -> None:
    import benchmarks.harness

    monkeypatch.setattr(mb, "RESULTS", tmp_path)
    monkeypatch.setattr(benchmarks.harness, "RESULTS", tmp_path)
    for name, label in (("a", "memc ILP @ int4"), ("b", "memc ILP @ 3 bits"), ("u", "uniform int4-g128")):
        raw = {f"{label} [gptq]": {"bytes": 2e6, "delta_pct": 0.3, "se_pct": 0.02, "method": "gptq"},
               "notes": ["shared", f"artifact {name}"]}
        Table(name, f"cmd {name}", ["point", "quantizer"], [[label, "gptq"]], raw["notes"], raw).write()
    mb._merge_only("all", "a,b,u")
    out = json.loads((tmp_path / "all.json").read_text())
    assert [r[0] for r in out["rows"]] == ["memc ILP @ int4", "memc ILP @ 3 bits", "uniform int4-g128"]
    md = (tmp_path / "all.md").read_text()
    assert md.count("shared") == 1 and "artifact a" in md and "artifact b" in md and "artifact u" in md
    assert (tmp_path / "all.png").exists()
    with pytest.raises(SystemExit, match="--merge"):
        mb._merge_only("all", "")
