"""Post-quantization distillation (quantize's distill_* options): it lowers the KL to the float program, keeps every
tensor's format, shapes and bytes, its trained codes + scales are exactly what the artifact stores (torch == ONNX
within 1e-4), it is deterministic, and bad options are clear errors."""
from __future__ import annotations

import pytest
import torch

from memc.config import TargetConfig
from memc.errors import ConfigError
from memc.passes.base import PassContext
from memc.passes.quant.apply import quantized_modules
from memc.passes.quant.distill import DistillPlan, TrainableQuant, distill
from memc.passes.quant.quantize import PLAN, Quantize, QuantizeOptions, rtn_all
from memc.quant.formats import parse_format
from memc.quant.sites import find_weights
from memc.schema import from_dict
from memc.targets.onnxruntime import OnnxRuntimeTarget
from tests.helpers import record_diff

PLAN_2BIT = {  # 2-bit affine, 4-bit symmetric, float32 scales: every kind of scale / zero point the target stores
    "model.embed_tokens.weight": "int4-g16-sym",
    **{f"model.layers.{i}.{m}.weight": "int2-g16" for i in (0, 1) for m in
       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")},
    **{f"model.layers.{i}.mlp.{m}_proj.weight": "int2-g32-s32" for i in (0, 1) for m in ("gate", "up")},
}


def _samples(n=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (2, 16), generator=gen),) for _ in range(n)]


def _quantize(program, **opts):
    program.annotations[PLAN] = PLAN_2BIT
    return Quantize(QuantizeOptions(method="rtn", **opts)).run(program, PassContext(seed=0, calibration=_samples()))


@pytest.mark.parametrize("scope", ["scales", "scales+weights"])
def test_distill_lowers_kl_and_keeps_formats(tiny_llama_program, scope):
    p = tiny_llama_program
    weights, _ = find_weights(p)
    q = rtn_all(p, weights, {n: parse_format(f) for n, f in PLAN_2BIT.items()})
    norms = {n: t.detach().clone() for n, t in p.module.named_parameters() if t.dim() == 1}
    out, m = distill(p, weights, q, _samples(), DistillPlan(40, 1e-2, scope, 0, weight_lr=5e-2))
    assert m["kl_after"] < 0.8 * m["kl_before"] and m["applied"], m
    for name, t in out.items():
        assert t.fmt == q[name].fmt and t.shape == q[name].shape and torch.equal(t.zeros, q[name].zeros)
        assert t.scales.dtype == q[name].scales.dtype and t.scales.shape == q[name].scales.shape
        assert {k: v.shape for k, v in t.packed().items()} == {k: v.shape for k, v in q[name].packed().items()}
        assert t.nbytes() == q[name].nbytes()
    assert any(not torch.equal(out[n].scales, q[n].scales) for n in out)  # scales did train
    assert (m["codes_changed"] > 0) == (scope == "scales+weights")  # codes move only with latent weights
    assert any(not torch.equal(t, norms[n]) for n, t in p.module.named_parameters() if t.dim() == 1)


def test_training_that_does_not_help_is_discarded(tiny_llama_program):
    p = tiny_llama_program
    weights, _ = find_weights(p)
    q = rtn_all(p, weights, {n: parse_format(f) for n, f in PLAN_2BIT.items()})
    norms = {n: t.detach().clone() for n, t in p.module.named_parameters() if t.dim() == 1}
    out, m = distill(p, weights, q, _samples(), DistillPlan(3, 5.0, "scales", 0))  # a rate far too high
    assert not m["applied"] and m["kl_after"] >= m["kl_before"], m
    assert all(out[n] is q[n] for n in q)
    assert all(torch.equal(t, norms[n]) for n, t in p.module.named_parameters() if t.dim() == 1)


def test_trainable_round_trip_is_exact():
    """Before any step the training form is the quantizer's weight, and its stored form its exact QuantTensor."""
    from memc.quant.rtn import rtn

    w = torch.randn(24, 40)
    for fmt in ("int2-g16", "int4-g32-sym", "int8-g16-s32"):
        q = rtn(w, parse_format(fmt))
        for latent in (False, True):
            t = TrainableQuant(q, latent)
            assert torch.equal(t.weight().detach(), q.dequantize())
            s = t.stored()
            assert all(torch.equal(a, b) for a, b in zip(s.packed().values(), q.packed().values()))


def test_distilled_artifact_matches_torch_and_is_deterministic(tiny_llama_program, tmp_path):
    import copy

    p2, p3 = (tiny_llama_program.replace(module=copy.deepcopy(tiny_llama_program.module), annotations={}, log=[])
              for _ in range(2))
    res = _quantize(tiny_llama_program, distill_steps=8, distill_lr=1e-2, distill_scope="scales+weights")
    again = _quantize(p2, distill_steps=8, distill_lr=1e-2, distill_scope="scales+weights")
    d = res.metrics["distill"]
    assert d["kl_after"] < d["kl_before"] and d["steps"] == 8
    plain = _quantize(p3)
    assert res.metrics["quantized_bytes"] == plain.metrics["quantized_bytes"]  # same bytes as without distillation
    mods, mods2 = quantized_modules(res.program), quantized_modules(again.program)
    for name, m in mods.items():  # same seed, same artifacts
        assert all(torch.equal(a, b) for a, b in zip(m.buffers(), mods2[name].buffers()))
    program = res.program
    target = OnnxRuntimeTarget(TargetConfig())
    target.build(program, tmp_path)
    v = target.verify(program, tmp_path, _samples(2, seed=11))
    record_diff("quantize + distill: onnx vs torch", v.worst["logits"])
    assert v.passed and v.worst["logits"] <= 1e-4


@pytest.mark.parametrize("bad, match", [
    ({"distill_steps": -1}, "distill_steps must be >= 0"),
    ({"distill_lr": 0.0}, "distill_lr must be > 0"),
    ({"distill_weight_lr": -1.0}, "distill_weight_lr must be > 0"),
    ({"distill_context": 1}, "distill_context must be >= 2"),
    ({"distill_scope": "weights"}, "distill_scope"),
])
def test_bad_options_name_the_option(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(QuantizeOptions, {"format": "int4-g32", **bad}, "pipeline[0]")


def test_windows_need_calibration_text(tiny_llama_program):
    with pytest.raises(ConfigError, match="distill_windows: windows need calibration text"):
        _quantize(tiny_llama_program, distill_steps=2, distill_windows=4)
