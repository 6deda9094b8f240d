"""distill-attention trains only the new layers, lowers their teacher-fed error, is deterministic from the seed,
and refuses text it must not or cannot learn from."""
from __future__ import annotations

import pytest
import torch

from memc.errors import MemcError, PassError
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from tests.eval.conftest import save_tiny_llama
from tests.helpers import captured

MC = {"window": 4, "segment": 4, "feature_dim": 8}


def _distilled(source, seed: int = 0, **options):
    program = captured(source)
    opts = {"text": "trainsplit:code", "steps": 6, "batch": 2, "seq_len": 48, "eval_windows": 1, "lr": 1e-2,
            "log_every": 2, **options}
    passes = [create_pass("detect-attention", {}, "pipeline[0]"), create_pass("memory-caching", MC, "pipeline[1]"),
              create_pass("distill-attention", opts, "pipeline[2]")]
    frozen = {n: p.detach().clone() for n, p in program.module.named_parameters() if ".memory_caching." not in n}
    out = PassManager(passes).run(program, PassContext(seed=seed))
    return out, frozen


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """Byte-level (vocab 256), so the reference corpus tokenises without tokenizer files."""
    return save_tiny_llama(tmp_path_factory.mktemp("distill-llama"))


@pytest.fixture(scope="module")
def distilled(byte_llama):
    return _distilled(byte_llama)


def test_only_new_parameters_train_and_errors_drop(distilled):
    program, frozen = distilled
    params = dict(program.module.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    metrics = program.log[-1].metrics
    before, after = metrics["layer_error_before"], metrics["layer_error_after"]
    assert set(before) == {f"model.layers.{i}.self_attn.memory_caching" for i in range(2)}
    assert sum(a["error"] for a in after.values()) < sum(b["error"] for b in before.values())
    assert [p["step"] for p in metrics["loss_curve"]] == [0, 2, 4, 5]
    assert not any(m.training for m in program.module.modules() if hasattr(m, "memory_enabled"))


def test_deterministic_from_the_seed(byte_llama, distilled):
    again, _ = _distilled(byte_llama)
    first = {n: p for n, p in distilled[0].module.named_parameters() if ".memory_caching." in n}
    second = {n: p for n, p in again.module.named_parameters() if ".memory_caching." in n}
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


def test_end_to_end_phase_records_kl(byte_llama):
    program, _ = _distilled(byte_llama, steps=1, e2e_steps=3, log_every=1)
    assert [p["step"] for p in program.log[-1].metrics["e2e_kl_curve"]] == [0, 1, 2]


def test_held_out_text_is_refused(byte_llama):
    with pytest.raises(MemcError, match=r"pipeline\[2\]\.text: .heldout:code. is held-out evaluation text"):
        _distilled(byte_llama, text="heldout:code")


def test_too_short_text_names_the_option(byte_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n", encoding="utf-8")
    with pytest.raises(PassError, match=r"pipeline\[2\]\.text: .* has \d+ tokens; distillation .* needs at least"):
        _distilled(byte_llama, text=str(short))


def test_memory_caching_pipeline_compiles_to_onnx_and_verifies(byte_llama, tmp_path):
    """detect -> rewrite -> distill -> ONNX: the chunked-parallel form lowers and matches the rewritten program."""
    from tests.helpers import captured, compile_model, write_toml

    toml = write_toml(tmp_path / "mc.toml", """
        [[pipeline]]
        pass = "detect-attention"
        [[pipeline]]
        pass = "memory-caching"
        window = 4
        segment = 4
        feature_dim = 8
        router_bias_init = 0.0
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
    report = result.report
    assert report["verification"]["passed"]
    names = [p["name"] for p in report["passes"]]
    assert names == ["detect-attention", "memory-caching", "distill-attention"]
    assert report["passes"][1]["metrics"]["rewritten"] == [f"model.layers.{i}.self_attn.memory_caching" for i in range(2)]


def test_diverging_distillation_stops_naming_layers_and_step(byte_llama, monkeypatch):
    """A NaN gradient must not turn the layers into NaN silently: the pass stops at the first one."""
    import memc.passes.attention.distill as distill

    monkeypatch.setattr(distill, "relative_error", lambda y, target: (y * float("nan")).sum())
    with pytest.raises(PassError, match=r"pipeline\[2\]: teacher-fed distillation diverged at step 1: non-finite "
                                        r"gradients in model\.layers\.0\..*pipeline\[2\]\.lr"):
        _distilled(byte_llama, steps=2)


def _layers(program):
    return {n: p for n, p in program.module.named_parameters() if ".memory_caching." in n}


def test_router_loss_off_by_default_is_bit_identical(byte_llama, distilled):
    """router_loss = 0 (the default) trains exactly as before: the same weights as the run without the option."""
    explicit, _ = _distilled(byte_llama, router_loss=0.0)
    first, second = _layers(distilled[0]), _layers(explicit)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert "router_kl" not in distilled[0].log[-1].metrics["loss_curve"][0]


def test_router_loss_lowers_the_router_kl_to_the_teacher(byte_llama, distilled):
    """With the router loss on, stage 1 records it and the routers end closer to the teacher's segment mass."""
    program, _ = _distilled(byte_llama, steps=20, router_loss=1.0)
    baseline, _ = _distilled(byte_llama, steps=20)
    metrics = program.log[-1].metrics
    assert all("router_kl" in p for p in metrics["loss_curve"])
    kl = lambda m: sum(e["router_kl"] for e in m.log[-1].metrics["layer_error_after"].values())
    assert kl(program) < 0.9 * kl(baseline)


@pytest.mark.parametrize("value", [-1.0, float("inf"), "heavy"])
def test_bad_router_loss_names_the_option(byte_llama, value):
    with pytest.raises(MemcError, match=r"router_loss"):
        _distilled(byte_llama, router_loss=value)


def test_memory_loss_lowers_the_memory_kl_to_the_teacher(byte_llama, distilled):
    """With the memory loss on, stage 1 records it and the layers end closer to the teacher's weight per memory token;
    off (the default) it is not in the curve."""
    program, _ = _distilled(byte_llama, steps=20, lr=3e-2, memory_loss=1.0)
    baseline, _ = _distilled(byte_llama, steps=20, lr=3e-2)
    assert all("memory_kl" in p for p in program.log[-1].metrics["loss_curve"])
    assert "memory_kl" not in distilled[0].log[-1].metrics["loss_curve"][0]
    kl = lambda m: sum(e["memory_kl"] for e in m.log[-1].metrics["layer_error_after"].values())
    assert kl(program) < 0.9 * kl(baseline)


@pytest.mark.parametrize("value", [-1.0, float("nan")])
@pytest.mark.parametrize("name", ["memory_loss", "attention_loss"])
def test_bad_memory_loss_names_the_option(byte_llama, value, name):
    with pytest.raises(MemcError, match=name):
        _distilled(byte_llama, **{name: value})


def test_attention_loss_lowers_the_attention_kl_to_the_teacher(byte_llama):
    program, _ = _distilled(byte_llama, steps=20, lr=3e-2, attention_loss=1.0)
    baseline, _ = _distilled(byte_llama, steps=20, lr=3e-2)
    assert all("attention_kl" in p for p in program.log[-1].metrics["loss_curve"])
    kl = lambda m: sum(e["attention_kl"] for e in m.log[-1].metrics["layer_error_after"].values())
    assert kl(program) < 0.9 * kl(baseline)
