"""memc.load(artifact_dir): run model.onnx and generate through decode.onnx without importing torch, checked
against the original Hugging Face model; bad artifacts and bad inputs give one ArtifactError each."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import memc
from memc.errors import ArtifactError, MemcError
from memc.runtime import CompiledModel
from tests.helpers import DEFAULT_ATOL, REPO_ROOT, load_hf_original, max_abs_diff, record_diff


@pytest.fixture(scope="module")
def artifact(compiled, tiny_llama_dir, decode_artifact, tmp_path_factory) -> Path:
    """A memc output directory of the tiny llama with model.onnx + report.json (memc compile) and decode.onnx
    (memc.codegen.decode), both built once per session and shared with other tests."""
    res = compiled(tiny_llama_dir)
    assert res.rc == 0, res.explain()
    out = tmp_path_factory.mktemp("artifact") / "llama"
    out.mkdir()
    for name in ("model.onnx", "report.json"):
        shutil.copyfile(res.out_dir / name, out / name)
    shutil.copyfile(decode_artifact("llama"), out / "decode.onnx")
    return out


def _greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> np.ndarray:
    """Greedy continuation with full forwards (no KV cache): the reference generate() must reproduce."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids.numpy()


def test_run_and_generate_without_torch(artifact, tiny_llama_dir, tmp_path):
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 11), dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import memc

        model = memc.load({str(artifact)!r}, threads=1)
        ids = np.load({str(tmp_path / 'ids.npy')!r})
        (logits,) = model.run(ids)
        generated = model.generate(ids[:, :5], max_new_tokens=6)
        np.savez({str(tmp_path / 'out.npz')!r}, logits=logits, generated=generated)
        print(model.input_names, model.output_names, model.has_decode_graph, model.report["schema"])
        assert "torch" not in sys.modules, "memc.load imported torch"
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['input_ids'] ['logits'] True memc.report/1"
    out = np.load(tmp_path / "out.npz")
    model = load_hf_original(tiny_llama_dir)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), use_cache=False).logits
    diff = max_abs_diff(expected, out["logits"])
    record_diff("memc.load run (llama)", diff)
    assert diff <= DEFAULT_ATOL
    assert np.array_equal(out["generated"], _greedy(model, torch.from_numpy(ids[:, :5]), 6))


def test_load_is_the_runtime_handle(artifact):
    model = memc.load(artifact)
    assert isinstance(model, CompiledModel) and model.report["source"]["kind"] == "hf"
    one_row = model.generate([1, 2, 3], max_new_tokens=2)
    assert one_row.shape == (5,) and list(one_row[:3]) == [1, 2, 3]
    sampled = [model.generate([[1, 2, 3]] * 2, max_new_tokens=8, temperature=1.0, top_k=20, seed=s) for s in (5, 5, 6)]
    assert sampled[0].shape == (2, 11) and np.array_equal(sampled[0], sampled[1])
    assert not np.array_equal(sampled[0], sampled[2])
    (by_name,) = model.run(input_ids=[[1, 2, 3]])  # lists are fine; int64 by name
    (by_pos,) = model.run(np.array([[1, 2, 3]], dtype=np.int32))  # int32 is cast
    assert np.array_equal(by_name, by_pos) and by_name.shape == (1, 3, 128)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda m: m.run(), "run() is missing input(s) ['input_ids']; the model takes ['input_ids']"),
        (lambda m: m.run(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64)), "run() got 2 positional inputs"),
        (lambda m: m.run(ids=np.zeros((1, 3), np.int64)), "run() got an input named 'ids'"),
        (lambda m: m.run(np.zeros((1, 3), np.float32)), "input 'input_ids' has dtype float32; the model takes int64"),
        (lambda m: m.run(np.zeros(3, np.int64)), "input 'input_ids' has shape [3]; the model takes [batch, seq]"),
        (lambda m: m.generate([1, 2], max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
        (lambda m: m.generate([[1.5, 2.0]], max_new_tokens=2), "prompt_ids must be integer token ids"),
        (lambda m: m.generate([1, 500], max_new_tokens=1), "token ids must be in [0, 128)"),
        (lambda m: m.generate([1, 2], max_new_tokens=2, temperature=-1.0), "temperature must be a finite number >= 0"),
        (lambda m: m.generate([1, 2], max_new_tokens=2, top_p=2.0), "top_p must be in (0, 1]"),
        (lambda m: m.generate([1, 2], max_new_tokens=2, temprature=1.0), "unknown option(s) ['temprature']"),
    ],
)
def test_bad_inputs_are_one_artifact_error(artifact, call, needle):
    model = memc.load(artifact)
    with pytest.raises(ArtifactError) as info:
        call(model)
    assert needle in str(info.value)


def test_generate_needs_a_decode_graph(artifact, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(artifact / "model.onnx", bare / "model.onnx")  # no report.json either: still loadable
    model = memc.load(bare)
    assert model.report is None and not model.has_decode_graph
    with pytest.raises(ArtifactError, match="has no decode.onnx") as info:
        model.generate([1, 2], 3)
    assert "target.decode_graph" in str(info.value)


def test_not_an_artifact(tmp_path, artifact):
    with pytest.raises(ArtifactError, match="is not a memc artifact: it does not exist"):
        memc.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="is not a memc artifact: it has no model.onnx"):
        memc.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ArtifactError, match="is not a loadable ONNX model"):
        memc.load(broken)
    future = tmp_path / "future"
    future.mkdir()
    shutil.copyfile(artifact / "model.onnx", future / "model.onnx")
    (future / "report.json").write_text(json.dumps({"schema": "memc.report/2"}))
    with pytest.raises(ArtifactError, match="has schema 'memc.report/2'; this memc reads 'memc.report/1'"):
        memc.load(future)
    assert issubclass(ArtifactError, MemcError) and ArtifactError.exit_code == 2
