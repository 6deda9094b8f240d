"""The memory-caching pass with variant = select inserts SelectiveMemoryAttention layers (keep every token: the
original model exactly), and distill-attention trains only their salience scorers, lowering the regression loss."""
from __future__ import annotations

import pytest
import torch

from memc.errors import ConfigError
from memc.nn.selective import SelectiveMemoryAttention
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from tests.eval.conftest import save_tiny_llama
from tests.helpers import LAYERS, captured, token_batch


def _run(source, mc: dict, distill: dict | None = None):
    passes = [create_pass("detect-attention", {}, "pipeline[0]"), create_pass("memory-caching", mc, "pipeline[1]")]
    if distill is not None:
        passes.append(create_pass("distill-attention", distill, "pipeline[2]"))
    return PassManager(passes).run(captured(source), PassContext(seed=0))


def test_keeping_every_token_reproduces_the_original_model(tiny_llama_dir):
    program = _run(tiny_llama_dir, {"variant": "select", "window": 3, "segment": 4})
    layers = [m for m in program.module.modules() if isinstance(m, SelectiveMemoryAttention)]
    assert len(layers) == LAYERS
    ids = token_batch(2, 23)["input_ids"]
    want = captured(tiny_llama_dir)(ids)[0]
    assert float((program(ids)[0] - want).abs().max()) < 1e-4
    for m in layers:
        m.memory_enabled = False  # the ablation is window attention, which differs
    assert float((program(ids)[0] - want).abs().max()) > 1e-3


@pytest.mark.parametrize("option, value", [("keep", 9), ("max_tokens", -1)])
def test_bad_select_options_name_the_option(option, value):
    with pytest.raises(ConfigError, match=rf"pipeline\[1\].*{option}"):
        create_pass("memory-caching", {"variant": "select", "segment": 8, option: value}, "pipeline[1]")


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("select-llama"))


def test_distillation_trains_only_the_scorers_and_lowers_their_loss(byte_llama):
    mc = {"variant": "select", "window": 4, "segment": 4, "keep": 2, "max_tokens": 6}
    opts = {"text": "trainsplit:code", "steps": 20, "batch": 2, "seq_len": 48, "eval_windows": 1, "lr": 1e-2,
            "log_every": 5}
    frozen = {n: p.detach().clone() for n, p in captured(byte_llama).module.named_parameters()}
    program = _run(byte_llama, mc, opts)
    params = dict(program.module.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    metrics = program.log[-1].metrics
    before, after = metrics["layer_error_before"], metrics["layer_error_after"]
    assert sum(a["salience_mse"] for a in after.values()) < sum(b["salience_mse"] for b in before.values())
    again = _run(byte_llama, mc, opts)  # deterministic from the seed
    assert all(torch.equal(p, dict(again.module.named_parameters())[n]) for n, p in params.items())


def test_select_pipeline_compiles_to_onnx_and_verifies(byte_llama, tmp_path):
    """detect -> rewrite (select, capped) -> distill -> ONNX: the parallel form lowers and matches the program."""
    from tests.helpers import compile_model, write_toml

    toml = write_toml(tmp_path / "select.toml", """
        [[pipeline]]
        pass = "detect-attention"
        [[pipeline]]
        pass = "memory-caching"
        variant = "select"
        window = 4
        segment = 4
        keep = 2
        max_tokens = 3
        [[pipeline]]
        pass = "distill-attention"
        steps = 2
        batch = 1
        seq_len = 48
        eval_windows = 1
        [target]
        verify_shapes = [[1, 37]]
    """)
    result = compile_model(byte_llama, tmp_path / "out", "-c", toml)
    assert result.rc == 0, result.explain()
    assert result.report["verification"]["passed"]


def test_end_to_end_steps_are_refused_for_select_layers(byte_llama):
    from memc.errors import PassError

    mc = {"variant": "select", "window": 4, "segment": 4}
    with pytest.raises(PassError, match=r"pipeline\[2\]\.e2e_steps.*select layers.*set it to 0"):
        _run(byte_llama, mc, {"text": "trainsplit:code", "steps": 1, "e2e_steps": 2, "batch": 1, "seq_len": 48})


def test_shipped_select_toolchain_is_valid(tmp_path):
    from tests.helpers import REPO_ROOT, run_cli

    rc, out, err = run_cli(["compile", REPO_ROOT / "models" / "ref-llama", "-c",
                            REPO_ROOT / "toolchains" / "memory-caching.toml", "-o", tmp_path / "o", "--dry-run"])
    assert rc == 0, err
    assert "variant='select'" in out and "max_tokens=256" in out and "e2e_steps=0" in out
    assert not (tmp_path / "o").exists()


def test_pretrained_select_toolchain_loads_the_committed_layers():
    """toolchains/memory-caching-pretrained.toml's layer options agree with the committed select layers (a
    mismatch is refused by name), and the layers it loads are those weights."""
    import tomllib

    from safetensors import safe_open

    from tests.helpers import REPO_ROOT

    cfg = tomllib.loads((REPO_ROOT / "toolchains" / "memory-caching-pretrained.toml").read_text())
    stages = [dict(s) for s in cfg["pipeline"][:2]]
    assert [s.pop("pass") for s in stages] == ["detect-attention", "memory-caching"]
    stages[1]["weights"] = str(REPO_ROOT / stages[1]["weights"])
    passes = [create_pass(n, o, f"pipeline[{i}]") for i, (n, o) in
              enumerate(zip(["detect-attention", "memory-caching"], stages))]
    program = PassManager(passes).run(captured(REPO_ROOT / "models" / "ref-llama"), PassContext(seed=0))
    layers = {n: m for n, m in program.module.named_modules() if isinstance(m, SelectiveMemoryAttention)}
    assert len(layers) == 4
    with safe_open(stages[1]["weights"], framework="pt") as f:
        for name, layer in layers.items():
            for pname, p in layer.named_parameters():
                assert torch.equal(p.detach(), f.get_tensor(f"{name}.{pname}"))
