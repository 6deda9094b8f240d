"""prune-experts through `memc compile`: ONNX artifact verified and smaller by the freed bytes, a transformers-loadable
checkpoint with the smaller expert count, and one clear error (exit 2, nothing written) per bad input."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import compile_model, load_hf_original, max_abs_diff, record_diff, run_onnx, token_batch, write_toml

PIPELINE = """
[calibration]
num_samples = 2

[[pipeline]]
pass = "detect-moe"

[[pipeline]]
pass = "moe-calibrate"
text = "{text}"

[[pipeline]]
pass = "prune-experts"
{prune}

[output]
hf_checkpoint = {hf}
"""


def _toml(tmp_path, text="samples", prune="keep = 2", hf="false", name="t.toml"):
    return write_toml(tmp_path / name, PIPELINE.format(text=text, prune=prune, hf=hf))


def test_pruned_artifact_and_hf_checkpoint(tmp_path, tiny_hf, compiled):
    src = tiny_hf("qwen3-moe")
    res = compile_model(src, tmp_path / "out", "-c", _toml(tmp_path, hf="true"))
    assert res.rc == 0, res.explain()
    assert res.report["verification"]["passed"]
    prune = next(p for p in res.report["passes"] if p["name"] == "prune-experts")["metrics"]
    assert prune["experts_after"] == [2, 2] and all(len(k) == 2 for k in prune["kept"].values())
    # the unpruned model.onnx: the session's expert-cache compile of the same model (tests/codegen/test_expert_cache.py)
    full = compiled(src, "--set", "target.expert_cache.slots=2")
    assert full.rc == 0, full.explain()
    saved = full.onnx_path.stat().st_size - res.onnx_path.stat().st_size
    assert abs(saved - prune["bytes_freed"]) <= 0.01 * prune["bytes_freed"]  # smaller by what the report predicts
    # transformers loads hf/ with 2 experts, and it computes what the ONNX artifact computes
    hf = load_hf_original(res.out_dir / "hf", moe=True)
    saved_config = json.loads((res.out_dir / "hf" / "config.json").read_text())
    assert hf.config.num_experts == 2 and saved_config["num_local_experts"] == 2
    ids = token_batch(2, 13, seed=5)["input_ids"]
    with torch.no_grad():
        expected = hf(input_ids=ids, use_cache=False).logits
    (actual,) = run_onnx(res.onnx_path, {"input_ids": ids})
    diff = max_abs_diff(expected, actual)
    record_diff("pruned qwen3-moe onnx vs hf checkpoint", diff)
    assert diff <= 1e-4


BAD = {
    "keep >= E": ("qwen3-moe", {"prune": "keep = 4"}, "prunes nothing"),
    "keep < k": ("qwen3-moe", {"prune": "keep = 1"}, "fewer than its top-k"),
    "held-out calibration": ("qwen3-moe", {"text": "heldout:code"}, "held-out"),
    "no MoE layer": ("llama", {}, "no MoE layer"),
    "unequal DeepSeek groups": ("deepseek-v3", {"prune": "keep = 3"}, "groups"),
    # random scores of seed 6 give the global budget of 6 experts as [4, 2] (seeds 0-5 land on [3, 3]):
    # a config holds one expert count, so the checkpoint is refused after pruning, before the lowering
    "non-uniform hf checkpoint": ("olmoe", {"prune": 'keep = 3\nbudget = "global"\ncriterion = "random"', "hf": "true"},
                                  "non-uniformly ([2, 4] experts per layer)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error(case, tmp_path, tiny_hf):
    family, fields, message = BAD[case]
    out = tmp_path / "out"
    res = compile_model(tiny_hf(family), out, "-c", _toml(tmp_path, **fields), "--seed", "6")
    assert res.rc == 2, res.explain()
    assert message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("memc: error:") == 1
    assert not out.exists()


def test_criterion_without_calibration_and_empty_text(tmp_path, tiny_hf):
    cfg = write_toml(tmp_path / "nocal.toml", """
        [[pipeline]]
        pass = "detect-moe"
        [[pipeline]]
        pass = "prune-experts"
        keep = 2
        criterion = "ean"
    """)
    res = compile_model(tiny_hf("qwen3-moe"), tmp_path / "a", "-c", cfg)
    assert res.rc == 2 and "needs calibration statistics" in res.stderr and "moe-calibrate" in res.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    res = compile_model(tiny_hf("qwen3-moe"), tmp_path / "b", "-c", _toml(tmp_path, text=str(empty), name="e.toml"))
    assert res.rc == 2 and "is empty" in res.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_options_fail_at_dry_run(tmp_path, tiny_hf):
    res = compile_model(tiny_hf("qwen3-moe"), tmp_path / "o", "-c", _toml(tmp_path, prune="keep_fraction = 1.5"), "--dry-run")
    assert res.rc == 2 and "pipeline[2]" in res.stderr and "keep_fraction" in res.stderr
    res = compile_model(tiny_hf("qwen3-moe"), tmp_path / "o", "-c", _toml(tmp_path, prune='keep = 2\ncriterion = "best"', name="c.toml"), "--dry-run")
    assert res.rc == 2 and "pipeline[2].criterion" in res.stderr


def test_shipped_toolchain_is_valid(tmp_path):
    from tests.helpers import REPO_ROOT, run_cli

    rc, out, err = run_cli(["compile", REPO_ROOT / "models" / "ref-moe", "-c", REPO_ROOT / "toolchains" / "prune-experts.toml",
                            "-o", tmp_path / "o", "--dry-run"])
    assert rc == 0, err
    assert "prune-experts (keep=0, keep_fraction=0.5" in out and "moe-calibrate (text='trainsplit:code'" in out
